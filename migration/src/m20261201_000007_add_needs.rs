//! Ordered plans: what each story and epic needs before it may start.
//!
//! - `run_story_need` holds one row per story-level need (story `story_id` needs story
//!   `needs_story_id`); `run_epic_need` one row per epic-level need (every story of `epic_id`
//!   needs every story of `needs_epic_id`), so that an epic of 5,000 stories needing another of
//!   5,000 is one row, not 25 million. Both cascade with their run and their stories or epics.
//! - `run_story.unmet_needs` counts what a story still waits for: one per epic its epic needs
//!   that has not completed, plus one while `waits_on_stories` (some story it needs directly has
//!   not been seen completed: `run_story_need.met` is false on one of its rows); a story is
//!   claimable only at 0. `run_story.needed_by` and `run_epic.needed_by` count the rows that
//!   point at a story or an epic, so that finishing one that nobody needs costs nothing more.
//! - `ix_run_story_need_open` (story, met) finds a story's first unmet need in one probe,
//!   however many needs it has.
//! - `ix_run_story_ready` (run, status, unmet needs, position) keeps the candidate query an
//!   indexed look however many stories still wait.
//! - `run.fail_fast`: the plan asked to cancel the rest of the run on the first failure.
//!
//! The down step drops the two tables, the index and the columns; every other row stays.

use crate::idens::{Run, RunEpic, RunEpicNeed, RunStory, RunStoryNeed};
use crate::schema_types::uuid;
use sea_orm_migration::prelude::*;

const READY_INDEX: &str = "ix_run_story_ready";
const STORY_DEPENDENTS_INDEX: &str = "ix_run_story_need_needs";
const EPIC_DEPENDENTS_INDEX: &str = "ix_run_epic_need_needs";
const STORY_OPEN_INDEX: &str = "ix_run_story_need_open";

#[derive(DeriveMigrationName)]
pub struct Migration;

fn counter(name: impl IntoIden) -> ColumnDef {
    ColumnDef::new(name)
        .integer()
        .not_null()
        .default(0)
        .to_owned()
}

fn flag(name: impl IntoIden) -> ColumnDef {
    ColumnDef::new(name)
        .boolean()
        .not_null()
        .default(false)
        .to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Run::Table)
                    .add_column(
                        ColumnDef::new(Run::FailFast)
                            .boolean()
                            .not_null()
                            .default(false),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(RunEpic::Table)
                    .add_column(counter(RunEpic::NeededBy))
                    .to_owned(),
            )
            .await?;
        // One column per statement: SQLite's ALTER TABLE adds one at a time.
        for column in [RunStory::UnmetNeeds, RunStory::NeededBy] {
            manager
                .alter_table(
                    Table::alter()
                        .table(RunStory::Table)
                        .add_column(counter(column))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(RunStory::Table)
                    .add_column(flag(RunStory::WaitsOnStories))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(READY_INDEX)
                    .table(RunStory::Table)
                    .col(RunStory::RunId)
                    .col(RunStory::Status)
                    .col(RunStory::UnmetNeeds)
                    .col(RunStory::Position)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunStoryNeed::Table)
                    .col(uuid(RunStoryNeed::RunId).not_null())
                    .col(uuid(RunStoryNeed::StoryId).not_null())
                    .col(uuid(RunStoryNeed::NeedsStoryId).not_null())
                    .col(flag(RunStoryNeed::Met))
                    .primary_key(
                        Index::create()
                            .col(RunStoryNeed::StoryId)
                            .col(RunStoryNeed::NeedsStoryId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_story_need_run")
                            .from(RunStoryNeed::Table, RunStoryNeed::RunId)
                            .to(Run::Table, Run::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_story_need_story")
                            .from(RunStoryNeed::Table, RunStoryNeed::StoryId)
                            .to(RunStory::Table, RunStory::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_story_need_needs")
                            .from(RunStoryNeed::Table, RunStoryNeed::NeedsStoryId)
                            .to(RunStory::Table, RunStory::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Finishing a story looks up the stories that need it.
        manager
            .create_index(
                Index::create()
                    .name(STORY_DEPENDENTS_INDEX)
                    .table(RunStoryNeed::Table)
                    .col(RunStoryNeed::NeedsStoryId)
                    .to_owned(),
            )
            .await?;
        // Whether a story still has an unmet need: one probe.
        manager
            .create_index(
                Index::create()
                    .name(STORY_OPEN_INDEX)
                    .table(RunStoryNeed::Table)
                    .col(RunStoryNeed::StoryId)
                    .col(RunStoryNeed::Met)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(RunEpicNeed::Table)
                    .col(uuid(RunEpicNeed::RunId).not_null())
                    .col(uuid(RunEpicNeed::EpicId).not_null())
                    .col(uuid(RunEpicNeed::NeedsEpicId).not_null())
                    .primary_key(
                        Index::create()
                            .col(RunEpicNeed::EpicId)
                            .col(RunEpicNeed::NeedsEpicId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_epic_need_run")
                            .from(RunEpicNeed::Table, RunEpicNeed::RunId)
                            .to(Run::Table, Run::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_epic_need_epic")
                            .from(RunEpicNeed::Table, RunEpicNeed::EpicId)
                            .to(RunEpic::Table, RunEpic::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_run_epic_need_needs")
                            .from(RunEpicNeed::Table, RunEpicNeed::NeedsEpicId)
                            .to(RunEpic::Table, RunEpic::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name(EPIC_DEPENDENTS_INDEX)
                    .table(RunEpicNeed::Table)
                    .col(RunEpicNeed::NeedsEpicId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RunEpicNeed::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(RunStoryNeed::Table).to_owned())
            .await?;
        manager
            .drop_index(
                Index::drop()
                    .name(READY_INDEX)
                    .table(RunStory::Table)
                    .to_owned(),
            )
            .await?;
        for column in [
            RunStory::WaitsOnStories,
            RunStory::NeededBy,
            RunStory::UnmetNeeds,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(RunStory::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(RunEpic::Table)
                    .drop_column(RunEpic::NeededBy)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Run::Table)
                    .drop_column(Run::FailFast)
                    .to_owned(),
            )
            .await
    }
}
