//! A plan or run as a graph of its needs, drawn as Graphviz DOT or as a Mermaid flowchart.
//!
//! [`Graph`] is a plain model: epics with their stories, their `needs`, and a status when the
//! graph is of a run (none for a plan file). [`Graph::render`] draws it:
//!
//! - one box (DOT cluster, Mermaid subgraph) per epic, titled with the epic's title, holding
//!   one node per story, labelled with its title and, when known, its status; nodes are
//!   coloured by status (pending grey, running blue, completed green, failed red, skipped and
//!   cancelled light grey, skipped dashed);
//! - edges in the direction of execution, from a need to what needs it; an epic's need of
//!   another epic is one edge between the two boxes, not one per pair of stories.
//!
//! Titles and keys are escaped, so no title can break either format; node ids are made of
//! positions (`s0_3`: epic 0, story 3; `e0`, `cluster_0`: epic 0), never of keys. Needs that
//! name nothing in the graph, or the epic or story itself, are not drawn.
//!
//! ```
//! use run_engine::{Plan, graph::{Graph, GraphFormat}};
//! let plan = Plan::parse(r#"
//! name = "demo"
//! [[epics]]
//! key = "build"
//! [[epics.stories]]
//! key = "compile"
//! command = "true"
//! [[epics]]
//! key = "test"
//! needs = ["build"]
//! [[epics.stories]]
//! key = "unit"
//! command = "true"
//! [[epics.stories]]
//! key = "lint"
//! command = "true"
//! needs = ["unit"]
//! "#, "demo.toml")?;
//! let mermaid = Graph::from_plan(&plan).render(GraphFormat::Mermaid);
//! assert!(mermaid.contains("e0 --> e1"));
//! assert!(mermaid.contains("s1_0 --> s1_1"));
//! let dot = Graph::from_plan(&plan).render("dot".parse()?);
//! assert!(dot.contains("s0_0 -> s1_0 [ltail=cluster_0, lhead=cluster_1];"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::plan::{Plan, StoryRef};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// A plan or a run: its title and its epics, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graph {
    /// The plan's or run's title.
    pub title: String,
    /// The epics, in order.
    pub epics: Vec<GraphEpic>,
}

/// An epic of a [`Graph`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphEpic {
    /// Key, unique within the graph.
    pub key: String,
    /// Title.
    pub title: String,
    /// Status (`"running"`, ...) for a run; `None` for a plan file.
    pub status: Option<String>,
    /// The keys of the epics it needs.
    pub needs: Vec<String>,
    /// The stories, in order.
    pub stories: Vec<GraphStory>,
}

/// A story of a [`GraphEpic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphStory {
    /// Key, unique within its epic.
    pub key: String,
    /// Title.
    pub title: String,
    /// Status (`"completed"`, ...) for a run; `None` for a plan file.
    pub status: Option<String>,
    /// The stories it needs.
    pub needs: Vec<StoryRef>,
}

/// How [`Graph::render`] draws: `dot` or `mermaid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GraphFormat {
    /// Graphviz DOT (`dot -Tsvg`).
    Dot,
    /// A Mermaid flowchart.
    Mermaid,
}

/// A graph format name that is neither `dot` nor `mermaid`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown graph format {0:?} (expected \"dot\" or \"mermaid\")")]
pub struct UnknownGraphFormat(pub String);

impl FromStr for GraphFormat {
    type Err = UnknownGraphFormat;

    /// `dot` or `mermaid`, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("dot") {
            Ok(GraphFormat::Dot)
        } else if s.eq_ignore_ascii_case("mermaid") {
            Ok(GraphFormat::Mermaid)
        } else {
            Err(UnknownGraphFormat(s.to_owned()))
        }
    }
}

impl fmt::Display for GraphFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GraphFormat::Dot => "dot",
            GraphFormat::Mermaid => "mermaid",
        })
    }
}

/// How a status is drawn.
struct Style {
    /// Mermaid class name.
    class: &'static str,
    fill: &'static str,
    stroke: &'static str,
    dashed: bool,
}

/// Every status that has a style, in the order Mermaid classes are declared.
const STYLES: &[Style] = &[
    Style {
        class: "pending",
        fill: "#e0e0e0",
        stroke: "#808080",
        dashed: false,
    },
    Style {
        class: "running",
        fill: "#cfe2ff",
        stroke: "#1f6feb",
        dashed: false,
    },
    Style {
        class: "completed",
        fill: "#d1f0d8",
        stroke: "#2e7d32",
        dashed: false,
    },
    Style {
        class: "failed",
        fill: "#f8d0d4",
        stroke: "#c62828",
        dashed: false,
    },
    Style {
        class: "skipped",
        fill: "#f2f2f2",
        stroke: "#a0a0a0",
        dashed: true,
    },
    Style {
        class: "cancelled",
        fill: "#f2f2f2",
        stroke: "#a0a0a0",
        dashed: false,
    },
];

fn style_of(status: Option<&str>) -> Option<&'static Style> {
    let status = status?;
    STYLES.iter().find(|s| s.class == status)
}

/// The edges of a graph, by position: story needs `(need, dependent)` as `(epic, story)`
/// pairs, and epic needs `(needed epic, dependent epic)`.
pub(crate) struct Edges {
    pub(crate) stories: Vec<((usize, usize), (usize, usize))>,
    pub(crate) epics: Vec<(usize, usize)>,
}

impl Graph {
    /// The graph of a plan file: no statuses.
    pub fn from_plan(plan: &Plan) -> Graph {
        Graph {
            title: plan.title.clone(),
            epics: plan
                .epics
                .iter()
                .map(|e| GraphEpic {
                    key: e.key.clone(),
                    title: e.title.clone(),
                    status: None,
                    needs: e.needs.clone(),
                    stories: e
                        .stories
                        .iter()
                        .map(|s| GraphStory {
                            key: s.key.clone(),
                            title: s.title.clone(),
                            status: None,
                            needs: s.needs.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The graph of a run as read from the database, each epic and story with its status now.
    pub fn from_run_tree(tree: &crate::status::RunTree) -> Graph {
        // `epic.story` back into its parts: the split whose epic has that story (keys may hold
        // dots).
        let resolve = |name: &str| -> Option<StoryRef> {
            name.match_indices('.').find_map(|(i, _)| {
                let (epic, story) = (name.get(..i)?, name.get(i + 1..)?);
                tree.epics
                    .iter()
                    .any(|e| e.key == epic && e.stories.iter().any(|s| s.key == story))
                    .then(|| StoryRef {
                        epic: epic.to_owned(),
                        story: story.to_owned(),
                    })
            })
        };
        Graph {
            title: tree.run.title.clone(),
            epics: tree
                .epics
                .iter()
                .map(|e| GraphEpic {
                    key: e.key.clone(),
                    title: e.title.clone(),
                    status: Some(e.status.clone()),
                    needs: e.needs.clone(),
                    stories: e
                        .stories
                        .iter()
                        .map(|s| GraphStory {
                            key: s.key.clone(),
                            title: s.title.clone(),
                            status: Some(s.status.clone()),
                            needs: s.needs.iter().filter_map(|n| resolve(n)).collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// The graph drawn in `format`.
    pub fn render(&self, format: GraphFormat) -> String {
        match format {
            GraphFormat::Dot => self.dot(),
            GraphFormat::Mermaid => self.mermaid(),
        }
    }

    /// The needs as positions; needs that name nothing in the graph are left out.
    pub(crate) fn edges(&self) -> Edges {
        let mut epics_by_key: HashMap<&str, usize> = HashMap::new();
        let mut stories_by_key: Vec<HashMap<&str, usize>> = Vec::new();
        for (e, epic) in self.epics.iter().enumerate() {
            epics_by_key.entry(epic.key.as_str()).or_insert(e);
            let mut keys = HashMap::new();
            for (j, story) in epic.stories.iter().enumerate() {
                keys.entry(story.key.as_str()).or_insert(j);
            }
            stories_by_key.push(keys);
        }
        let mut edges = Edges {
            stories: Vec::new(),
            epics: Vec::new(),
        };
        for (e, epic) in self.epics.iter().enumerate() {
            for need in &epic.needs {
                match epics_by_key.get(need.as_str()) {
                    Some(&a) if a != e => edges.epics.push((a, e)),
                    _ => {}
                }
            }
            for (j, story) in epic.stories.iter().enumerate() {
                for need in &story.needs {
                    let found = epics_by_key.get(need.epic.as_str()).and_then(|&a| {
                        let keys = stories_by_key.get(a)?;
                        Some((a, *keys.get(need.story.as_str())?))
                    });
                    match found {
                        Some(t) if t != (e, j) => edges.stories.push((t, (e, j))),
                        _ => {}
                    }
                }
            }
        }
        edges
    }

    fn dot(&self) -> String {
        let mut out = String::from("digraph run {\n");
        out.push_str(&format!("  label=\"{}\";\n", dot_escape(&self.title)));
        out.push_str("  labelloc=t;\n  compound=true;\n  rankdir=LR;\n");
        out.push_str("  node [shape=box, style=\"rounded,filled\", fillcolor=\"#ffffff\"];\n");
        for (e, epic) in self.epics.iter().enumerate() {
            out.push_str(&format!("  subgraph cluster_{e} {{\n"));
            out.push_str(&format!(
                "    label=\"{}\";\n",
                dot_escape(&with_status(&epic.title, epic.status.as_deref(), "\n"))
            ));
            match style_of(epic.status.as_deref()) {
                Some(s) if s.dashed => out.push_str(&format!(
                    "    style=\"rounded,dashed\";\n    color=\"{}\";\n",
                    s.stroke
                )),
                Some(s) => {
                    out.push_str(&format!(
                        "    style=rounded;\n    color=\"{}\";\n",
                        s.stroke
                    ));
                }
                None => out.push_str("    style=rounded;\n"),
            }
            if epic.stories.is_empty() {
                // An epic-level edge needs a node inside the cluster to start or end at.
                out.push_str(&format!(
                    "    e{e} [label=\"\", shape=point, style=invis];\n"
                ));
            }
            for (j, story) in epic.stories.iter().enumerate() {
                let label = dot_escape(&with_status(&story.title, story.status.as_deref(), "\n"));
                let attrs = match style_of(story.status.as_deref()) {
                    Some(s) => format!(
                        ", style=\"{}\", fillcolor=\"{}\", color=\"{}\"",
                        if s.dashed {
                            "rounded,filled,dashed"
                        } else {
                            "rounded,filled"
                        },
                        s.fill,
                        s.stroke
                    ),
                    None => String::new(),
                };
                out.push_str(&format!("    s{e}_{j} [label=\"{label}\"{attrs}];\n"));
            }
            out.push_str("  }\n");
        }
        let edges = self.edges();
        for ((a, i), (b, j)) in edges.stories {
            out.push_str(&format!("  s{a}_{i} -> s{b}_{j};\n"));
        }
        for (a, b) in edges.epics {
            let from = self.dot_anchor(a);
            let to = self.dot_anchor(b);
            out.push_str(&format!(
                "  {from} -> {to} [ltail=cluster_{a}, lhead=cluster_{b}];\n"
            ));
        }
        out.push_str("}\n");
        out
    }

    /// A node inside epic `e`'s cluster, for an edge between clusters.
    fn dot_anchor(&self, e: usize) -> String {
        match self.epics.get(e).map(|epic| epic.stories.is_empty()) {
            Some(false) => format!("s{e}_0"),
            _ => format!("e{e}"),
        }
    }

    fn mermaid(&self) -> String {
        let mut out = format!("---\ntitle: \"{}\"\n---\n", yaml_escape(&self.title));
        out.push_str("flowchart LR\n");
        let mut classes: Vec<(&'static str, String)> = Vec::new();
        for (e, epic) in self.epics.iter().enumerate() {
            let title = with_status(&epic.title, epic.status.as_deref(), "\n");
            out.push_str(&format!(
                "  subgraph e{e} [\"{}\"]\n",
                mermaid_escape(&title)
            ));
            for (j, story) in epic.stories.iter().enumerate() {
                let label = with_status(&story.title, story.status.as_deref(), "\n");
                out.push_str(&format!("    s{e}_{j}[\"{}\"]\n", mermaid_escape(&label)));
                if let Some(s) = style_of(story.status.as_deref()) {
                    classes.push((s.class, format!("s{e}_{j}")));
                }
            }
            out.push_str("  end\n");
        }
        let edges = self.edges();
        for ((a, i), (b, j)) in edges.stories {
            out.push_str(&format!("  s{a}_{i} --> s{b}_{j}\n"));
        }
        for (a, b) in edges.epics {
            out.push_str(&format!("  e{a} --> e{b}\n"));
        }
        for style in STYLES {
            let members: Vec<&str> = classes
                .iter()
                .filter(|(c, _)| *c == style.class)
                .map(|(_, id)| id.as_str())
                .collect();
            if members.is_empty() {
                continue;
            }
            let dash = if style.dashed {
                ",stroke-dasharray:5 5"
            } else {
                ""
            };
            out.push_str(&format!(
                "  classDef {} fill:{},stroke:{}{dash}\n  class {} {}\n",
                style.class,
                style.fill,
                style.stroke,
                members.join(","),
                style.class
            ));
        }
        out
    }
}

/// `title`, then `(status)` on a new line when the status is known.
fn with_status(title: &str, status: Option<&str>, newline: &str) -> String {
    match status {
        Some(s) => format!("{title}{newline}({s})"),
        None => title.to_owned(),
    }
}

/// `text` with each character of `table` replaced by its text, a line feed by `newline`, a
/// carriage return dropped, and other control characters as spaces.
fn escape(text: &str, table: &[(char, &str)], newline: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match table.iter().find(|(from, _)| *from == c) {
            Some((_, to)) => out.push_str(to),
            None if c == '\n' => out.push_str(newline),
            None if c == '\r' => {}
            None if c.is_control() => out.push(' '),
            None => out.push(c),
        }
    }
    out
}

/// Text for inside a DOT double-quoted string: `"` and `\` escaped, a line feed as DOT's
/// `\n`, other control characters as spaces.
fn dot_escape(text: &str) -> String {
    escape(text, &[('"', "\\\""), ('\\', "\\\\")], "\\n")
}

/// Text for inside a Mermaid double-quoted label: the characters Mermaid reads as markup as
/// entity codes (`#quot;`, `#lt;`, `#gt;`, `#35;`, `#37;`, ...), a line feed as `<br>`, other control
/// characters as spaces.
fn mermaid_escape(text: &str) -> String {
    const TABLE: &[(char, &str)] = &[
        ('"', "#quot;"),
        ('<', "#lt;"),
        ('>', "#gt;"),
        ('#', "#35;"),
        ('%', "#37;"),
        ('&', "#amp;"),
        ('`', "#96;"),
    ];
    escape(text, TABLE, "<br>")
}

/// Text for inside a YAML double-quoted string (Mermaid's front matter): `"` and `\`
/// escaped, control characters as spaces.
fn yaml_escape(text: &str) -> String {
    escape(text, &[('"', "\\\""), ('\\', "\\\\"), ('\r', " ")], " ")
}

#[cfg(test)]
#[path = "graph_tests.rs"]
mod tests;
