"""the index type of each model (index_spec)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 23:45:00.000000

A nullable JSON column: null is the exact flat index every model had before, so existing rows
need no update. op.add_column through a batch, as 0003, so the same step runs on SQLite and PostgreSQL.
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('index_spec', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('index_spec')
