//! Strongly connected components and cycles of a directed graph, without recursion (a chain
//! of 10,000 stories is 10,000 deep), in time linear in nodes and edges.

use std::collections::VecDeque;
use std::ops::Range;

/// A graph in compressed adjacency form: the edges of node `v` are
/// `targets[starts[v]..starts[v + 1]]`.
pub(super) struct Adjacency {
    starts: Vec<usize>,
    targets: Vec<usize>,
}

impl Adjacency {
    /// The graph of `node_count` nodes with these `(from, to, label)` edges (labels unused).
    pub(super) fn of<L>(node_count: usize, edges: &[(usize, usize, L)]) -> Adjacency {
        let mut starts = vec![0; node_count + 1];
        for &(from, _, _) in edges {
            if let Some(c) = starts.get_mut(from + 1) {
                *c += 1;
            }
        }
        for v in 0..node_count {
            starts[v + 1] += starts[v];
        }
        let mut next = starts.clone();
        let mut targets = vec![0; edges.len()];
        for &(from, to, _) in edges {
            if let Some(slot) = next.get_mut(from) {
                if let Some(t) = targets.get_mut(*slot) {
                    *t = to;
                }
                *slot += 1;
            }
        }
        Adjacency { starts, targets }
    }

    /// The positions of node `v`'s edges, for [`Adjacency::target`].
    pub(super) fn edges(&self, v: usize) -> Range<usize> {
        let start = self.starts.get(v).copied().unwrap_or(0);
        start..self.starts.get(v + 1).copied().unwrap_or(start)
    }

    /// Where the edge at position `edge` goes.
    pub(super) fn target(&self, edge: usize) -> usize {
        self.targets.get(edge).copied().unwrap_or(0)
    }
}

/// No node, no index yet.
pub(super) const UNSEEN: usize = usize::MAX;

/// The strongly connected component of each node (Tarjan's algorithm, with an explicit
/// stack instead of recursion: a chain of 10,000 stories is 10,000 deep).
pub(super) fn components(graph: &Adjacency, node_count: usize) -> Vec<usize> {
    let mut index = vec![UNSEEN; node_count];
    let mut low = vec![0; node_count];
    let mut on_stack = vec![false; node_count];
    let mut component = vec![UNSEEN; node_count];
    let mut stack = Vec::new();
    let mut calls: Vec<(usize, usize)> = Vec::new();
    let (mut counter, mut components) = (0, 0);
    for root in 0..node_count {
        if index[root] != UNSEEN {
            continue;
        }
        index[root] = counter;
        low[root] = counter;
        counter += 1;
        stack.push(root);
        on_stack[root] = true;
        calls.push((root, graph.edges(root).start));
        while let Some(&(v, edge)) = calls.last() {
            if edge < graph.edges(v).end {
                if let Some(call) = calls.last_mut() {
                    call.1 += 1;
                }
                let w = graph.target(edge);
                if index[w] == UNSEEN {
                    index[w] = counter;
                    low[w] = counter;
                    counter += 1;
                    stack.push(w);
                    on_stack[w] = true;
                    calls.push((w, graph.edges(w).start));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            calls.pop();
            if let Some(&(u, _)) = calls.last() {
                low[u] = low[u].min(low[v]);
            }
            if low[v] == index[v] {
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component[w] = components;
                    if w == v {
                        break;
                    }
                }
                components += 1;
            }
        }
    }
    component
}

/// A shortest cycle within component `c` through the edge `from -> to`: `from`, `to`, ...,
/// each node needing the next and the last needing `from`. `parent` is scratch space (all
/// [`UNSEEN`] outside the nodes of earlier components).
pub(super) fn cycle_through(
    graph: &Adjacency,
    component: &[usize],
    c: usize,
    from: usize,
    to: usize,
    parent: &mut [usize],
) -> Vec<usize> {
    let mut queue = VecDeque::from([to]);
    if let Some(p) = parent.get_mut(to) {
        *p = to;
    }
    let mut reached = to == from;
    while let Some(v) = queue.pop_front() {
        if reached {
            break;
        }
        for edge in graph.edges(v) {
            let w = graph.target(edge);
            if component.get(w) != Some(&c) || parent.get(w) != Some(&UNSEEN) {
                continue;
            }
            if let Some(p) = parent.get_mut(w) {
                *p = v;
            }
            if w == from {
                reached = true;
                break;
            }
            queue.push_back(w);
        }
    }
    // Walk back from `from` to `to`, then put `from` first.
    let mut path = Vec::new();
    let mut v = from;
    while v != to {
        path.push(v);
        match parent.get(v) {
            Some(&p) if p != UNSEEN && p != v => v = p,
            _ => break,
        }
    }
    path.push(to);
    path.push(from);
    path.reverse();
    path.pop();
    path
}
