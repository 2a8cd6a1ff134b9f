"""The Streamlit app: `app/main.py` is the entry (navigation), `app/widgets.py` the widgets pages share."""
