//! Checking `needs`: every name resolved, no self-need, no duplicate, no cycle.
//!
//! An epic's `needs` lists epic keys. A story's `needs` entry `n` is resolved like this:
//!
//! 1. if the story's own epic has a story whose key is exactly `n`, it is that story;
//! 2. else, if `n` contains a `.`, `n` is split at each `.` from the left, and the first split
//!    whose left part is an epic key of the plan and whose right part is a story key of that
//!    epic names the story (`build.compile` is story `compile` of epic `build`);
//! 3. else `n` is unknown.
//!
//! Cycles are found on a graph with one node per story and two per epic, `start(E)` and
//! `done(E)`: a story needs its epic's start, an epic's done needs each of its stories, a
//! story need is one edge between two stories and an epic need "B needs A" is one edge
//! `start(B) -> done(A)`, so an epic need costs one edge whatever the size of the epics and
//! the check is linear in stories and needs. One problem is reported per strongly connected
//! component with a cycle, at the first need of the component in file order, with one
//! concrete cycle through that need, in the direction of "needs" (`a -> b`: `a` needs `b`):
//!
//! - a story is written `epic.story`;
//! - an epic is written as its key: `build.compile -> test.unit -> build -> build.compile`
//!   reads "compile needs unit, unit (through its epic's needs) needs epic build, and epic
//!   build needs its story compile"; a cycle of epic needs only is `a -> b -> a`.
//!
//! Needs that name nothing (unknown, self, duplicate) are left out of the graph, so cycles
//! among the other needs are reported in the same pass.

use super::scc::{Adjacency, UNSEEN, components, cycle_through};
use super::validate::{MAX_KEY_LEN, at};
use super::{PlanEpic, PlanProblem, StoryRef};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use toml::Spanned;

/// The raw `needs` of one epic and of each of its stories, in file order.
pub(super) struct RawNeeds {
    /// The epic's own `needs`.
    pub(super) epic: Vec<Spanned<String>>,
    /// Each story's `needs`.
    pub(super) stories: Vec<Vec<Spanned<String>>>,
}

/// Who has a need: an epic, or story `.1` of epic `.0` (indexes in the plan).
#[derive(Clone, Copy)]
enum Owner {
    Epic(usize),
    Story(usize, usize),
}

/// One resolved need that is an edge of the graph.
struct Need {
    owner: Owner,
    index: usize,
    span: Range<usize>,
    spelling: String,
}

/// Resolves the needs of `epics` (the validated epics, in the order of `raw`), fills in their
/// `needs` fields, and reports what is wrong.
pub(super) fn check_needs(
    text: &str,
    epics: &mut [PlanEpic],
    raw: Vec<RawNeeds>,
    problems: &mut Vec<PlanProblem>,
) {
    let keys = Keys::of(epics);
    let mut graph = GraphBuilder::new(&keys);
    let mut epic_needs = Vec::with_capacity(epics.len());
    let mut story_needs = Vec::with_capacity(epics.len());
    for (e, raw) in raw.into_iter().enumerate() {
        let ekey = epic_key(epics, e);
        let mut seen: HashSet<usize> = HashSet::new();
        let mut resolved = Vec::new();
        for (k, need) in raw.epic.into_iter().enumerate() {
            let field = format!("epics[{e}].needs[{k}]");
            let name = need.get_ref();
            let who = format!("epic {ekey:?}");
            match keys.epics.get(name.as_str()).copied() {
                None => problems.push(at(
                    text,
                    need.span(),
                    field,
                    format!("{who} needs {name:?}, which is not an epic of the plan"),
                )),
                Some(a) if a == keys.first_epic(e) => {
                    problems.push(at(text, need.span(), field, format!("{who} needs itself")));
                }
                Some(a) if seen.contains(&a) => problems.push(at(
                    text,
                    need.span(),
                    field,
                    format!("{who} needs {name:?} twice"),
                )),
                Some(a) => {
                    seen.insert(a);
                    resolved.push(name.clone());
                    graph.epic_need(e, a, k, need);
                }
            }
        }
        epic_needs.push(resolved);
        let mut per_story = Vec::with_capacity(raw.stories.len());
        for (j, needs) in raw.stories.into_iter().enumerate() {
            let skey = story_key(epics, e, j);
            let who = format!("story {skey:?} in epic {ekey:?}");
            let mut seen: HashMap<(usize, usize), String> = HashMap::new();
            let mut resolved = Vec::new();
            for (k, need) in needs.into_iter().enumerate() {
                let field = format!("epics[{e}].stories[{j}].needs[{k}]");
                let name = need.get_ref();
                match keys.resolve(e, name) {
                    None => problems.push(at(
                        text,
                        need.span(),
                        field,
                        format!("{who} needs {name:?}, {}", keys.explain_unknown(ekey, name)),
                    )),
                    Some(t) if t == (e, j) => {
                        problems.push(at(text, need.span(), field, format!("{who} needs itself")));
                    }
                    Some(t) => match seen.get(&t) {
                        Some(first) if first == name => problems.push(at(
                            text,
                            need.span(),
                            field,
                            format!("{who} needs {name:?} twice"),
                        )),
                        Some(first) => problems.push(at(
                            text,
                            need.span(),
                            field,
                            format!("{who} needs {name:?} twice (first as {first:?})"),
                        )),
                        None => {
                            seen.insert(t, name.clone());
                            resolved.push(StoryRef {
                                epic: epic_key(epics, t.0).to_owned(),
                                story: story_key(epics, t.0, t.1).to_owned(),
                            });
                            graph.story_need(e, j, t, k, need);
                        }
                    },
                }
            }
            per_story.push(resolved);
        }
        story_needs.push(per_story);
    }
    report_cycles(text, epics, graph, problems);
    for ((epic, needs), stories) in epics.iter_mut().zip(epic_needs).zip(story_needs) {
        epic.needs = needs;
        for (story, needs) in epic.stories.iter_mut().zip(stories) {
            story.needs = needs;
        }
    }
}

/// The keys of a plan, for resolving names: the first epic of each key, and per epic the
/// first story of each key.
struct Keys {
    epics: HashMap<String, usize>,
    stories: Vec<HashMap<String, usize>>,
    /// Per epic, the first epic with its key.
    first: Vec<usize>,
    /// Per epic, where its stories start among all stories.
    offsets: Vec<usize>,
    /// Per epic, how many stories it has.
    lens: Vec<usize>,
    story_count: usize,
}

impl Keys {
    fn of(epics: &[PlanEpic]) -> Keys {
        let mut by_key = HashMap::with_capacity(epics.len());
        let mut stories = Vec::with_capacity(epics.len());
        let mut first = Vec::with_capacity(epics.len());
        let mut offsets = Vec::with_capacity(epics.len());
        let mut lens = Vec::with_capacity(epics.len());
        let mut story_count = 0;
        for (e, epic) in epics.iter().enumerate() {
            first.push(*by_key.entry(epic.key.clone()).or_insert(e));
            let mut keys = HashMap::with_capacity(epic.stories.len());
            for (j, story) in epic.stories.iter().enumerate() {
                keys.entry(story.key.clone()).or_insert(j);
            }
            stories.push(keys);
            offsets.push(story_count);
            lens.push(epic.stories.len());
            story_count += epic.stories.len();
        }
        Keys {
            epics: by_key,
            stories,
            first,
            offsets,
            lens,
            story_count,
        }
    }

    /// The epic that names epic `e`: itself, or the first epic with the same key.
    fn first_epic(&self, e: usize) -> usize {
        self.first.get(e).copied().unwrap_or(e)
    }

    /// The graph node of story `j` of epic `e`.
    fn node(&self, e: usize, j: usize) -> usize {
        self.offsets.get(e).copied().unwrap_or(0) + j
    }

    fn story(&self, epic: usize, key: &str) -> Option<usize> {
        self.stories.get(epic).and_then(|s| s.get(key)).copied()
    }

    /// The `(epic, story)` that need `name` of a story of epic `own` names.
    fn resolve(&self, own: usize, name: &str) -> Option<(usize, usize)> {
        if let Some(j) = self.story(own, name) {
            return Some((own, j));
        }
        self.splits(name).find_map(|(epic, story)| {
            let e = *self.epics.get(epic)?;
            Some((e, self.story(e, story)?))
        })
    }

    /// The `epic.story` splits of `name` that could name a story (no key is longer than
    /// [`MAX_KEY_LEN`], which bounds the work for a long name).
    fn splits<'n>(&self, name: &'n str) -> impl Iterator<Item = (&'n str, &'n str)> {
        name.match_indices('.')
            .map(|(i, _)| i)
            .take_while(|&i| i <= MAX_KEY_LEN)
            .filter(move |&i| name.len() - i - 1 <= MAX_KEY_LEN)
            .filter_map(move |i| Some((name.get(..i)?, name.get(i + 1..)?)))
    }

    /// What was looked for when need `name` of a story of epic `own` names nothing.
    fn explain_unknown(&self, own_key: &str, name: &str) -> String {
        let mut out = format!("which is not a story of epic {own_key:?}");
        let splits: Vec<_> = self.splits(name).collect();
        if splits.is_empty() {
            return out;
        }
        let known: Vec<String> = splits
            .iter()
            .filter(|(epic, _)| self.epics.contains_key(*epic))
            .map(|(epic, story)| format!("epic {epic:?} has no story {story:?}"))
            .collect();
        if known.is_empty() {
            let names: Vec<String> = splits.iter().map(|(epic, _)| format!("{epic:?}")).collect();
            out.push_str(&format!(", and there is no epic {}", names.join(" or ")));
        } else {
            out.push_str(&format!(", and {}", known.join(", and ")));
        }
        out
    }
}

/// The needs graph, in the direction of "needs" (`u -> v`: `u` needs `v`).
///
/// Nodes: the stories (`0..story_count`, epic by epic), then `done(E)` at
/// `story_count + 2E` and `start(E)` at `story_count + 2E + 1`.
struct GraphBuilder {
    story_count: usize,
    offsets: Vec<usize>,
    /// `(from, to, need)`: `need` indexes [`GraphBuilder::needs`] for the edge of a `needs`
    /// entry, and is `None` for an edge between an epic and its own stories.
    edges: Vec<(usize, usize, Option<usize>)>,
    needs: Vec<Need>,
}

/// A node of the needs graph, decoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Node {
    Story(usize, usize),
    Done(usize),
    Start(usize),
}

impl GraphBuilder {
    fn new(keys: &Keys) -> GraphBuilder {
        let s = keys.story_count;
        let mut edges = Vec::with_capacity(2 * s);
        for (e, &len) in keys.lens.iter().enumerate() {
            for j in 0..len {
                let story = keys.node(e, j);
                edges.push((story, s + 2 * e + 1, None));
                edges.push((s + 2 * e, story, None));
            }
        }
        GraphBuilder {
            story_count: s,
            offsets: keys.offsets.clone(),
            edges,
            needs: Vec::new(),
        }
    }

    fn node_count(&self) -> usize {
        self.story_count + 2 * self.offsets.len()
    }

    fn story_node(&self, e: usize, j: usize) -> usize {
        self.offsets.get(e).copied().unwrap_or(0) + j
    }

    fn decode(&self, node: usize) -> Node {
        if node >= self.story_count {
            let e = (node - self.story_count) / 2;
            if (node - self.story_count).is_multiple_of(2) {
                Node::Done(e)
            } else {
                Node::Start(e)
            }
        } else {
            // The last epic whose stories start at or before `node`.
            let e = self
                .offsets
                .partition_point(|&o| o <= node)
                .saturating_sub(1);
            Node::Story(e, node - self.offsets.get(e).copied().unwrap_or(0))
        }
    }

    /// Epic `b` needs epic `a`: `start(b) -> done(a)`.
    fn epic_need(&mut self, b: usize, a: usize, index: usize, need: Spanned<String>) {
        let s = self.story_count;
        self.push_need(s + 2 * b + 1, s + 2 * a, Owner::Epic(b), index, need);
    }

    /// Story `j` of epic `e` needs story `t`.
    fn story_need(
        &mut self,
        e: usize,
        j: usize,
        t: (usize, usize),
        index: usize,
        need: Spanned<String>,
    ) {
        let (from, to) = (self.story_node(e, j), self.story_node(t.0, t.1));
        self.push_need(from, to, Owner::Story(e, j), index, need);
    }

    fn push_need(
        &mut self,
        from: usize,
        to: usize,
        owner: Owner,
        index: usize,
        need: Spanned<String>,
    ) {
        let span = need.span();
        self.edges.push((from, to, Some(self.needs.len())));
        self.needs.push(Need {
            owner,
            index,
            span,
            spelling: need.into_inner(),
        });
    }
}

/// Reports one problem per strongly connected component with a cycle.
fn report_cycles(
    text: &str,
    epics: &[PlanEpic],
    graph: GraphBuilder,
    problems: &mut Vec<PlanProblem>,
) {
    if graph.needs.is_empty() {
        return;
    }
    let n = graph.node_count();
    let adjacency = Adjacency::of(n, &graph.edges);
    let component = components(&adjacency, n);
    // Every cycle has a need edge (an epic's own edges go story -> start, done -> story), and
    // a need edge within one component is on a cycle: the first such need of each component.
    let mut first: HashMap<usize, (usize, usize, usize)> = HashMap::new();
    for &(from, to, need) in &graph.edges {
        let (Some(need), Some(&c)) = (need, component.get(from)) else {
            continue;
        };
        if component.get(to) != Some(&c) {
            continue;
        }
        let offset = graph.needs.get(need).map_or(0, |x| x.span.start);
        let better = first
            .get(&c)
            .is_none_or(|&(_, _, best)| graph.needs.get(best).map_or(0, |x| x.span.start) > offset);
        if better {
            first.insert(c, (from, to, need));
        }
    }
    let mut found: Vec<(usize, usize, usize, usize)> = first
        .into_iter()
        .map(|(c, (from, to, need))| (c, from, to, need))
        .collect();
    found.sort_by_key(|&(_, _, _, need)| need);
    let mut parent = vec![UNSEEN; n];
    for (c, from, to, need) in found {
        let Some(need) = graph.needs.get(need) else {
            continue;
        };
        let cycle = cycle_through(&adjacency, &component, c, from, to, &mut parent);
        let who = match need.owner {
            Owner::Epic(e) => format!("epic {:?}", epic_key(epics, e)),
            Owner::Story(e, j) => format!(
                "story {:?} in epic {:?}",
                story_key(epics, e, j),
                epic_key(epics, e)
            ),
        };
        let field = match need.owner {
            Owner::Epic(e) => format!("epics[{e}].needs[{}]", need.index),
            Owner::Story(e, j) => format!("epics[{e}].stories[{j}].needs[{}]", need.index),
        };
        problems.push(at(
            text,
            need.span.clone(),
            field,
            format!(
                "{who} needs {:?}, a cycle: {}",
                need.spelling,
                spell(epics, &graph, &cycle)
            ),
        ));
    }
}

/// A cycle of graph nodes (each needing the next, the last needing the first) in words:
/// see the module documentation.
fn spell(epics: &[PlanEpic], graph: &GraphBuilder, cycle: &[usize]) -> String {
    let nodes: Vec<Node> = cycle.iter().map(|&v| graph.decode(v)).collect();
    let m = nodes.len();
    // Start at the node that owns the first need: a story, or for an epic need `start(B)`
    // its story before it, or `done(B)` before that story when the story only stands for B.
    let first = match nodes.first() {
        Some(&Node::Start(b)) if m >= 3 => match (nodes.get(m - 2), nodes.get(m - 1)) {
            (Some(&Node::Done(d)), Some(&Node::Story(e, _))) if d == b && e == b => m - 2,
            _ => m - 1,
        },
        Some(&Node::Start(_)) => m.saturating_sub(1),
        _ => 0,
    };
    let mut order = nodes.clone();
    order.rotate_left(first.min(m));
    let mut words: Vec<String> = Vec::with_capacity(m + 1);
    let mut i = 0;
    while i < m {
        match order.get(i).copied() {
            Some(Node::Done(e)) => {
                words.push(epic_key(epics, e).to_owned());
                // done(E) -> E.s -> start(E): s only stands for its epic.
                if let (Some(&Node::Story(se, _)), Some(&Node::Start(st))) =
                    (order.get(i + 1), order.get(i + 2))
                    && se == e
                    && st == e
                {
                    i += 1;
                }
            }
            Some(Node::Story(e, j)) => {
                words.push(format!("{}.{}", epic_key(epics, e), story_key(epics, e, j)));
            }
            Some(Node::Start(_)) | None => {}
        }
        i += 1;
    }
    if let Some(w) = words.first().cloned() {
        words.push(w);
    }
    words.dedup();
    words.join(" -> ")
}

fn epic_key(epics: &[PlanEpic], e: usize) -> &str {
    epics.get(e).map_or("", |ep| ep.key.as_str())
}

fn story_key(epics: &[PlanEpic], e: usize, j: usize) -> &str {
    epics
        .get(e)
        .and_then(|ep| ep.stories.get(j))
        .map_or("", |s| s.key.as_str())
}
