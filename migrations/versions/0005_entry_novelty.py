"""the novelty of each index entry (out-of-distribution warnings)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 13:30:00.000000

A nullable float beside each vector: the AE's reconstruction loss or the VAE's negative ELBO of the
image, written when it is encoded. Existing entries stay null (nothing to compute them from here: it
needs the model and the image); a query's percentile is taken over the entries that have one.
op.add_column through a batch, as 0003 and 0004, so the same step runs on SQLite and PostgreSQL.
"""

from alembic import op
import sqlalchemy as sa


revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("index_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("novelty", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("index_entries", schema=None) as batch_op:
        batch_op.drop_column("novelty")
