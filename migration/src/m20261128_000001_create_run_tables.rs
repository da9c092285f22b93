//! The run, its epics and their stories.

use crate::idens::{Run, RunEpic, RunStory};
use crate::schema_types::{timestamp, uuid, uuid_pk};
use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let b = manager.get_database_backend();
        manager
            .create_table(
                Table::create()
                    .table(Run::Table)
                    .col(uuid_pk(Run::Id))
                    .col(ColumnDef::new(Run::Key).string_len(255).not_null())
                    .col(ColumnDef::new(Run::Title).string_len(1024).not_null())
                    .col(ColumnDef::new(Run::Status).string_len(32).not_null())
                    .col(timestamp(b, Run::CreatedAt).not_null())
                    .col(timestamp(b, Run::UpdatedAt).not_null())
                    .col(timestamp(b, Run::StartedAt).null())
                    .col(timestamp(b, Run::FinishedAt).null())
                    .col(ColumnDef::new(Run::Error).text().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunEpic::Table)
                    .col(uuid_pk(RunEpic::Id))
                    .col(uuid(RunEpic::RunId).not_null())
                    .col(ColumnDef::new(RunEpic::Key).string_len(255).not_null())
                    .col(ColumnDef::new(RunEpic::Title).string_len(1024).not_null())
                    .col(ColumnDef::new(RunEpic::Position).integer().not_null())
                    .col(ColumnDef::new(RunEpic::Status).string_len(32).not_null())
                    .col(timestamp(b, RunEpic::CreatedAt).not_null())
                    .col(timestamp(b, RunEpic::UpdatedAt).not_null())
                    .col(timestamp(b, RunEpic::StartedAt).null())
                    .col(timestamp(b, RunEpic::FinishedAt).null())
                    .col(ColumnDef::new(RunEpic::Error).text().null())
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_epic_run")
                            .from(RunEpic::Table, RunEpic::RunId)
                            .to(Run::Table, Run::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_run_epic_run_key")
                    .table(RunEpic::Table)
                    .col(RunEpic::RunId)
                    .col(RunEpic::Key)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunStory::Table)
                    .col(uuid_pk(RunStory::Id))
                    .col(uuid(RunStory::RunId).not_null())
                    .col(uuid(RunStory::EpicId).not_null())
                    .col(ColumnDef::new(RunStory::Key).string_len(255).not_null())
                    .col(ColumnDef::new(RunStory::Title).string_len(1024).not_null())
                    .col(ColumnDef::new(RunStory::Position).integer().not_null())
                    .col(ColumnDef::new(RunStory::Status).string_len(32).not_null())
                    .col(
                        ColumnDef::new(RunStory::Attempts)
                            .integer()
                            .not_null()
                            .default(0),
                    )
                    .col(timestamp(b, RunStory::CreatedAt).not_null())
                    .col(timestamp(b, RunStory::UpdatedAt).not_null())
                    .col(timestamp(b, RunStory::StartedAt).null())
                    .col(timestamp(b, RunStory::FinishedAt).null())
                    .col(ColumnDef::new(RunStory::Error).text().null())
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_story_run")
                            .from(RunStory::Table, RunStory::RunId)
                            .to(Run::Table, Run::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_story_epic")
                            .from(RunStory::Table, RunStory::EpicId)
                            .to(RunEpic::Table, RunEpic::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_run_story_epic_key")
                    .table(RunStory::Table)
                    .col(RunStory::EpicId)
                    .col(RunStory::Key)
                    .unique()
                    .to_owned(),
            )
            .await?;
        // An executor's main query: a run's stories in a given status, in order.
        manager
            .create_index(
                Index::create()
                    .name("ix_run_story_run_status")
                    .table(RunStory::Table)
                    .col(RunStory::RunId)
                    .col(RunStory::Status)
                    .col(RunStory::Position)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RunStory::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(RunEpic::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Run::Table).to_owned())
            .await
    }
}
