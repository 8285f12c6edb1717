"""Alembic environment: runs on the connection that embedsearch hands over (see embedsearch.core.database.upgrade).

Run by hand from the repository root with ``alembic -x url=sqlite:///indexes/library.db upgrade head``
or, simpler, ``embedsearch db upgrade``.
"""

from alembic import context
from sqlalchemy import create_engine

from embedsearch.core.schema import Base

config = context.config
target_metadata = Base.metadata


def run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER most things, so Alembic rebuilds tables in a batch.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    with create_engine(url).connect() as conn:
        run(conn)
        conn.commit()
