"""The Streamlit app: `app/main.py` is the entry (the server with `app/host_guard.py` in front, and the navigation),
`app/widgets.py` the widgets pages share."""
