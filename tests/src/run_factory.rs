//! The one way tests and benchmarks make a run: [`RunFactory`] describes its epics and stories,
//! then creates the rows through run-domain's create functions or writes the plan file that
//! `run-engine create` reads.

use entity::{run, run_epic};
use run_domain::{CreateError, NewEpic, NewRun, NewStory, create_epic, create_run, create_stories};
use sea_orm::DatabaseConnection;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// A run to create: by default run `test` ("Test plan") of one epic holding one story, no
/// command, one attempt.
///
/// The epics are those declared with [`RunFactory::epic`], else [`RunFactory::epics`] of them
/// keyed `e0`, `e1`, …. An epic's stories are those declared with [`RunFactory::story`] after
/// it, else [`RunFactory::stories`] of them keyed `<epic>s000`, `<epic>s001`, … (unique across
/// the run), each running [`RunFactory::command`] with [`RunFactory::max_attempts`]. Epic and
/// story titles are their keys; positions count from 0 within the run and within the epic.
///
/// ```no_run
/// # async fn demo(db: &sea_orm::DatabaseConnection) {
/// use run_engine_tests::RunFactory;
/// let run = RunFactory::new().epics(2).stories(3).max_attempts(1).create(db).await;
/// assert_eq!(run.stories.len(), 6);
/// let named = RunFactory::new().key("r").epic("e").story("ok", "true", 1).story("bad", "false", 3);
/// named.create(db).await;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RunFactory {
    key: String,
    title: String,
    epics: usize,
    stories: usize,
    command: Option<String>,
    max_attempts: i32,
    declared: Vec<EpicPlan>,
}

/// What [`RunFactory::create`] made.
#[derive(Debug, Clone)]
pub struct CreatedRun {
    /// The run as created (pending, version 1).
    pub run: run::Model,
    /// Its epics in position order, as created.
    pub epics: Vec<run_epic::Model>,
    /// Its stories' ids, epic by epic in position order.
    pub stories: Vec<Uuid>,
}

impl CreatedRun {
    /// The run's id.
    pub fn id(&self) -> Uuid {
        self.run.id
    }
}

#[derive(Debug, Clone)]
struct EpicPlan {
    key: String,
    stories: Vec<StoryPlan>,
}

#[derive(Debug, Clone)]
struct StoryPlan {
    key: String,
    command: Option<String>,
    max_attempts: i32,
}

impl Default for RunFactory {
    fn default() -> Self {
        RunFactory {
            key: "test".into(),
            title: "Test plan".into(),
            epics: 1,
            stories: 1,
            command: None,
            max_attempts: 1,
            declared: Vec::new(),
        }
    }
}

impl RunFactory {
    /// The default run: one epic of one story.
    pub fn new() -> Self {
        Self::default()
    }

    /// The run's key (the plan's name).
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = key.into();
        self
    }

    /// The run's title.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = title.into();
        self
    }

    /// How many epics, keyed `e0`, `e1`, … (0: a run without epics, only its log).
    pub fn epics(mut self, n: usize) -> Self {
        self.epics = n;
        self
    }

    /// How many stories each epic holds, when it declares none of its own.
    pub fn stories(mut self, per_epic: usize) -> Self {
        self.stories = per_epic;
        self
    }

    /// The command of every story not declared with [`RunFactory::story`].
    pub fn command(mut self, command: impl Into<String>) -> Self {
        self.command = Some(command.into());
        self
    }

    /// The most attempts of every story not declared with [`RunFactory::story`].
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Declares an epic keyed `key`; declared epics replace the [`RunFactory::epics`] ones.
    pub fn epic(mut self, key: impl Into<String>) -> Self {
        self.declared.push(EpicPlan {
            key: key.into(),
            stories: Vec::new(),
        });
        self
    }

    /// Declares a story of the epic declared last; an epic's declared stories replace its
    /// [`RunFactory::stories`] ones.
    ///
    /// # Panics
    /// When no epic was declared before.
    pub fn story(mut self, key: &str, command: &str, max_attempts: i32) -> Self {
        let Some(epic) = self.declared.last_mut() else {
            panic!("RunFactory::story({key:?}): declare its epic with RunFactory::epic first");
        };
        epic.stories.push(StoryPlan {
            key: key.to_owned(),
            command: Some(command.to_owned()),
            max_attempts,
        });
        self
    }

    /// The epics and stories, declared or generated.
    fn plan(&self) -> Vec<EpicPlan> {
        let epics = if self.declared.is_empty() {
            (0..self.epics)
                .map(|e| EpicPlan {
                    key: format!("e{e}"),
                    stories: Vec::new(),
                })
                .collect()
        } else {
            self.declared.clone()
        };
        epics
            .into_iter()
            .map(|mut epic| {
                if epic.stories.is_empty() {
                    epic.stories = (0..self.stories)
                        .map(|s| StoryPlan {
                            key: format!("{}s{s:03}", epic.key),
                            command: self.command.clone(),
                            max_attempts: self.max_attempts,
                        })
                        .collect();
                }
                epic
            })
            .collect()
    }

    /// Creates the run, its epics and their stories.
    ///
    /// # Panics
    /// When a create fails (see [`RunFactory::try_create`]).
    pub async fn create(&self, db: &DatabaseConnection) -> CreatedRun {
        self.try_create(db)
            .await
            .unwrap_or_else(|e| panic!("creating run {:?} failed: {e}", self.key))
    }

    /// Creates the run, its epics and their stories, or says why it could not.
    pub async fn try_create(&self, db: &DatabaseConnection) -> Result<CreatedRun, CreateError> {
        let run = create_run(
            db,
            NewRun {
                key: self.key.clone(),
                title: self.title.clone(),
                fail_fast: false,
            },
        )
        .await?;
        let mut created = CreatedRun {
            run,
            epics: Vec::new(),
            stories: Vec::new(),
        };
        for (e, epic) in self.plan().into_iter().enumerate() {
            let row = create_epic(
                db,
                created.run.id,
                NewEpic {
                    title: epic.key.clone(),
                    key: epic.key,
                    position: position(e),
                },
            )
            .await?;
            let stories = epic
                .stories
                .into_iter()
                .enumerate()
                .map(|(s, story)| NewStory {
                    title: story.key.clone(),
                    key: story.key,
                    position: position(s),
                    command: story.command,
                    max_attempts: story.max_attempts,
                    ..NewStory::default()
                })
                .collect();
            created
                .stories
                .extend(create_stories(db, &row, stories).await?);
            created.epics.push(row);
        }
        Ok(created)
    }

    /// The plan file `run-engine create` reads for this run (epic and story titles left to
    /// their defaults).
    pub fn plan_toml(&self) -> String {
        let mut text = format!(
            "name = {}\ntitle = {}\n",
            toml_str(&self.key),
            toml_str(&self.title)
        );
        for epic in self.plan() {
            let _ = write!(text, "\n[[epics]]\nkey = {}\n", toml_str(&epic.key));
            for story in epic.stories {
                let _ = write!(text, "[[epics.stories]]\nkey = {}\n", toml_str(&story.key));
                if let Some(command) = story.command {
                    // A literal string: the shell's quotes and backslashes stay as written.
                    let _ = writeln!(text, "command = '''{command}'''");
                }
                let _ = writeln!(text, "max_attempts = {}", story.max_attempts);
            }
        }
        text
    }

    /// Writes [`RunFactory::plan_toml`] to `dir/plan.toml` and returns its path.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn write_plan(&self, dir: &Path) -> PathBuf {
        let path = dir.join("plan.toml");
        std::fs::write(&path, self.plan_toml())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}

/// A position from an index (plans of tests and benchmarks are far smaller than `i32::MAX`).
fn position(i: usize) -> i32 {
    i32::try_from(i).unwrap_or(i32::MAX)
}

/// A TOML basic string holding `s`.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_unique_across_the_run() {
        let plan = RunFactory::new().epics(2).stories(2).plan();
        let keys: Vec<&str> = plan
            .iter()
            .flat_map(|e| e.stories.iter().map(|s| s.key.as_str()))
            .collect();
        assert_eq!(keys, ["e0s000", "e0s001", "e1s000", "e1s001"]);
    }

    #[test]
    fn declared_stories_replace_the_generated_ones_of_their_epic() {
        let plan = RunFactory::new()
            .stories(5)
            .epic("e")
            .story("ok", "true", 2)
            .epic("f")
            .plan();
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].stories.len(), 1);
        assert_eq!(
            (
                plan[0].stories[0].key.as_str(),
                plan[0].stories[0].max_attempts
            ),
            ("ok", 2)
        );
        assert_eq!(plan[1].stories.len(), 5);
    }

    #[test]
    fn the_plan_file_is_the_one_tests_used_to_write_by_hand() {
        let text = RunFactory::new()
            .epics(1)
            .stories(1)
            .command("echo \"$X\"")
            .plan_toml();
        assert_eq!(
            text,
            "name = \"test\"\ntitle = \"Test plan\"\n\n[[epics]]\nkey = \"e0\"\n\
             [[epics.stories]]\nkey = \"e0s000\"\ncommand = '''echo \"$X\"'''\nmax_attempts = 1\n"
        );
    }
}
