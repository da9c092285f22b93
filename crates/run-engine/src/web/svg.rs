//! A run's graph of needs drawn as inline SVG, server-side, coloured by status.
//!
//! Layered layout by longest path: each epic is a box in the column of its longest chain of
//! epic needs; within a box, each story sits in the column of its longest chain of needs
//! within the epic. Epic needs are drawn box to box, story needs node to node. Runs of more
//! than [`MAX_STORIES_DRAWN`] stories are drawn epics only (each box with its counts). Every
//! text is escaped by the template; classes (`st-running`) carry the colours, so the page's
//! stylesheet draws them.

use crate::graph::Graph;
use crate::status::RunTree;
use maud::{Markup, html};
use std::collections::HashMap;

/// The most stories drawn one by one; above it, epics only.
pub const MAX_STORIES_DRAWN: usize = 400;

const NODE_W: i64 = 150;
const NODE_H: i64 = 26;
const GAP_X: i64 = 24;
const GAP_Y: i64 = 8;
const PAD: i64 = 10;
const TITLE_H: i64 = 22;
const EPIC_GAP_X: i64 = 48;
const EPIC_GAP_Y: i64 = 16;

/// Longest-path layers of `n` nodes over `edges` (from, to); nodes on a cycle (none in a valid
/// run) stay where the bounded relaxation leaves them.
fn layers(n: usize, edges: &[(usize, usize)]) -> Vec<usize> {
    let mut layer = vec![0usize; n];
    for _ in 0..=n {
        let mut changed = false;
        for &(a, b) in edges {
            let want = layer.get(a).copied().unwrap_or(0) + 1;
            if let Some(l) = layer.get_mut(b)
                && *l < want
                && want <= n
            {
                *l = want;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    layer
}

fn short(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

struct EpicBox {
    x: i64,
    y: i64,
    w: i64,
    h: i64,
}

/// The run's graph as an `<svg>` element.
pub fn render(tree: &RunTree) -> Markup {
    let graph = Graph::from_run_tree(tree);
    let edges = graph.edges();
    let total: usize = graph.epics.iter().map(|e| e.stories.len()).sum();
    let detailed = total <= MAX_STORIES_DRAWN;
    let epic_layer = layers(graph.epics.len(), &edges.epics);

    // Each story's position inside its epic's box: (column, row).
    let mut inner: Vec<Vec<(i64, i64)>> = Vec::new();
    let mut sizes: Vec<(i64, i64)> = Vec::new();
    for (e, epic) in graph.epics.iter().enumerate() {
        if !detailed {
            inner.push(Vec::new());
            sizes.push((NODE_W + 2 * PAD, TITLE_H + NODE_H + 2 * PAD));
            continue;
        }
        let own: Vec<(usize, usize)> = edges
            .stories
            .iter()
            .filter(|((ea, _), (eb, _))| *ea == e && *eb == e)
            .map(|((_, a), (_, b))| (*a, *b))
            .collect();
        let l = layers(epic.stories.len(), &own);
        let mut rows: HashMap<usize, i64> = HashMap::new();
        let mut pos = Vec::new();
        for &col in &l {
            let row = rows.entry(col).or_insert(0);
            pos.push((col as i64, *row));
            *row += 1;
        }
        let cols = l.iter().max().map_or(1, |m| *m as i64 + 1);
        let max_rows = rows.values().copied().max().unwrap_or(1).max(1);
        inner.push(pos);
        sizes.push((
            cols * (NODE_W + GAP_X) - GAP_X + 2 * PAD,
            TITLE_H + max_rows * (NODE_H + GAP_Y) - GAP_Y + 2 * PAD,
        ));
    }

    // Epic boxes: columns by layer, stacked within a column.
    let columns = epic_layer.iter().max().map_or(0, |m| m + 1);
    let mut col_x = vec![0i64; columns + 1];
    for c in 0..columns {
        let width = (0..graph.epics.len())
            .filter(|&e| epic_layer.get(e) == Some(&c))
            .filter_map(|e| sizes.get(e).map(|s| s.0))
            .max()
            .unwrap_or(0);
        col_x[c + 1] = col_x[c] + width + EPIC_GAP_X;
    }
    let mut col_y = vec![PAD; columns.max(1)];
    let mut boxes = Vec::new();
    for (e, &(w, h)) in sizes.iter().enumerate() {
        let c = epic_layer.get(e).copied().unwrap_or(0);
        let y = col_y.get(c).copied().unwrap_or(PAD);
        if let Some(slot) = col_y.get_mut(c) {
            *slot = y + h + EPIC_GAP_Y;
        }
        boxes.push(EpicBox {
            x: PAD + col_x.get(c).copied().unwrap_or(0),
            y,
            w,
            h,
        });
    }
    let width = col_x.last().copied().unwrap_or(0) + PAD;
    let height = col_y.iter().copied().max().unwrap_or(PAD) + PAD;
    let node = |e: usize, s: usize| -> Option<(i64, i64)> {
        let b = boxes.get(e)?;
        let (col, row) = *inner.get(e)?.get(s)?;
        Some((
            b.x + PAD + col * (NODE_W + GAP_X),
            b.y + TITLE_H + PAD + row * (NODE_H + GAP_Y),
        ))
    };

    html! {
        svg.graph xmlns="http://www.w3.org/2000/svg" width=(width.max(1)) height=(height.max(1))
            viewBox=(format!("0 0 {} {}", width.max(1), height.max(1))) role="img"
            aria-label="the run's graph of needs" {
            defs {
                marker #arrow viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" class="arrowhead" {}
                }
            }
            @for (a, b) in &edges.epics {
                @if let (Some(from), Some(to)) = (boxes.get(*a), boxes.get(*b)) {
                    path.edge.epic-edge marker-end="url(#arrow)"
                        d=(curve(from.x + from.w, from.y + from.h / 2, to.x, to.y + to.h / 2)) {}
                }
            }
            @for (e, epic) in graph.epics.iter().enumerate() {
                @if let Some(b) = boxes.get(e) {
                    @let status = epic.status.as_deref().unwrap_or("pending");
                    g.epic id=(format!("graph-epic-{}", epic.key)) {
                        rect class=(format!("epic-box st-{status}")) x=(b.x) y=(b.y) width=(b.w) height=(b.h) rx="6" {}
                        text.epic-title x=(b.x + PAD) y=(b.y + 16) { (short(&epic.title, 40)) " · " (status) }
                        @if !detailed {
                            @if let Some(view) = tree.epics.get(e) {
                                text.node-label x=(b.x + PAD) y=(b.y + TITLE_H + PAD + 17) {
                                    (view.counts.finished()) "/" (view.counts.total()) " stories done"
                                }
                            }
                        }
                    }
                }
            }
            @if detailed {
                @for ((ea, sa), (eb, sb)) in &edges.stories {
                    @if let (Some(from), Some(to)) = (node(*ea, *sa), node(*eb, *sb)) {
                        path.edge marker-end="url(#arrow)"
                            d=(curve(from.0 + NODE_W, from.1 + NODE_H / 2, to.0, to.1 + NODE_H / 2)) {}
                    }
                }
                @for (e, epic) in graph.epics.iter().enumerate() {
                    @for (s, story) in epic.stories.iter().enumerate() {
                        @if let Some((x, y)) = node(e, s) {
                            @let status = story.status.as_deref().unwrap_or("pending");
                            g.node {
                                title { (epic.key) "." (story.key) ": " (story.title) " (" (status) ")" }
                                rect class=(format!("story-node st-{status}")) x=(x) y=(y) width=(NODE_W) height=(NODE_H) rx="4" {}
                                text.node-label x=(x + 6) y=(y + 17) { (short(&story.key, 20)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A horizontal S-curve from (x1, y1) to (x2, y2).
fn curve(x1: i64, y1: i64, x2: i64, y2: i64) -> String {
    let mid = (x1 + x2) / 2;
    format!("M {x1} {y1} C {mid} {y1}, {mid} {y2}, {x2} {y2}")
}

#[cfg(test)]
mod tests {
    use super::layers;

    #[test]
    fn layers_follow_the_longest_path() {
        assert_eq!(
            layers(4, &[(0, 1), (1, 2), (0, 2), (3, 2)]),
            vec![0, 1, 2, 0]
        );
        // A cycle ends, wherever it leaves its nodes.
        assert_eq!(layers(2, &[(0, 1), (1, 0)]).len(), 2);
    }
}
