"""Storage: the metadata database (SQLAlchemy 2 + Alembic), the content-addressed image store and dataset versions.

Layout under the storage folder (`Settings.storage`):
    yolodex.db                                  metadata (SQLite, WAL) unless YOLODEX_DATABASE_URL points elsewhere
    images/<sha256[:2]>/<sha256>.<ext>          every accepted image, its bytes exactly as received
    datasets/<project>/<version>/               frozen dataset versions (images/, train.json, val.json[, test.json])
"""
