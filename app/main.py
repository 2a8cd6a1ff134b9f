"""The yolodex app: `streamlit run app/main.py` (what `make run` does). One page per workflow step, in `pages/`."""

import streamlit as st

from app.navigation import HOME, app_pages

st.set_page_config(page_title="yolodex", page_icon=":material/search:", layout="wide")
pages = app_pages()
navigation = st.navigation(
    [
        *pages.values(),
        # The default page is served at "/", so "/home" (a natural guess, or an old link) would be "Page not found":
        # a hidden page there sends the browser on to Home.
        st.Page(lambda: st.switch_page(pages[HOME]), title="Home", url_path="home", visibility="hidden"),
    ]
)
navigation.run()
