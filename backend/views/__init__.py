"""What the pages show, without a screen: each module gathers one page's queries, figures, tables and actions, so a
page is widgets → one call here → render. Nothing here imports Streamlit; figures are plotly objects, tables lists
of dicts."""
