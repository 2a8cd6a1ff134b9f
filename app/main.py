"""The yolodex app: `streamlit run app/main.py` (what `make run` does). One page per workflow step, in `pages/`.

This file is read two ways:
- `streamlit run` finds `app = st.App(...)` below and serves it (Streamlit's ASGI mode). It imports this file once,
  as the module `main`: the server with `HostGuard` in front, so every request, the first included, is checked
  against the app's own names (app/host_guard.py, docs/host_names.md).
- Each browser session runs it as its script (`__name__ == "__main__"`, as under AppTest): the navigation.
"""

import sys

import streamlit as st

if __name__ == "__main__":  # a session's script run
    from app.navigation import HOME, app_pages

    st.set_page_config(page_title="yolodex", page_icon=":material/search:", layout="wide")
    pages = app_pages()
    navigation = st.navigation(
        [
            *pages.values(),
            # The default page is served at "/", so "/home" (a natural guess, or an old link) would be "Page not
            # found": a hidden page there sends the browser on to Home.
            st.Page(lambda: st.switch_page(pages[HOME]), title="Home", url_path="home", visibility="hidden"),
        ]
    )
    navigation.run()
else:  # the server, imported once by `streamlit run app/main.py`
    from starlette.middleware import Middleware

    from app.host_guard import HostGuard
    from backend.settings import get_settings

    try:
        trusted_hosts = get_settings().trusted_hosts
    except ValueError as error:  # a YOLODEX_* variable yolodex cannot use: one line, not a traceback
        sys.exit(f"yolodex: {error}")
    app = st.App(__file__, middleware=[Middleware(HostGuard, trusted_hosts=trusted_hosts)])
