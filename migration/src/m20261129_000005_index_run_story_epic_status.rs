//! An index for the question an executor asks each time it finishes a story: does this epic
//! still have a pending or running story? Without it the answer reads every story of the epic,
//! so finishing an epic of n stories one by one would cost n² row reads.

use crate::idens::RunStory;
use sea_orm_migration::prelude::*;

const NAME: &str = "ix_run_story_epic_status";

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name(NAME)
                    .table(RunStory::Table)
                    .col(RunStory::EpicId)
                    .col(RunStory::Status)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(Index::drop().name(NAME).table(RunStory::Table).to_owned())
            .await
    }
}
