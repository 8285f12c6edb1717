"""the resize policy (fit) of each model

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 21:10:00.000000

Existing models get 'pad', the only policy there was, except those a build between the policy's
arrival and this column recorded as crop in their config: they keep crop. Plain SELECT and UPDATE
through SQLAlchemy Core, so the same steps run on SQLite and PostgreSQL.
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fit', sa.String(length=16), server_default='pad', nullable=False))
    models = sa.table('models', sa.column('id', sa.Integer), sa.column('config', sa.JSON), sa.column('fit', sa.String))
    conn = op.get_bind()
    rows = conn.execute(sa.select(models.c.id, models.c.config)).all()
    cropped = [row.id for row in rows if isinstance(row.config, dict) and row.config.get('fit') == 'crop']
    if cropped:
        conn.execute(sa.update(models).where(models.c.id.in_(cropped)).values(fit='crop'))


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_column('fit')
