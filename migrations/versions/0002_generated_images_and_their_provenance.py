"""generated images and their provenance

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 11:23:12.692811
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.add_column(sa.Column('generated', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('provenance', sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f('ix_images_generated'), ['generated'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_images_generated'))
        batch_op.drop_column('provenance')
        batch_op.drop_column('generated')

