//! Tests of the graph model and its renderers.

use super::*;

fn example() -> Graph {
    let plan = Plan::parse(
        r#"
name = "example"
title = "Example plan"
[[epics]]
key = "build"
title = "Build"
[[epics.stories]]
key = "fetch"
command = "true"
[[epics.stories]]
key = "compile"
command = "true"
needs = ["fetch"]
[[epics]]
key = "test"
title = "Test"
needs = ["build"]
[[epics.stories]]
key = "unit"
command = "true"
[[epics.stories]]
key = "lint"
command = "true"
[[epics]]
key = "package"
title = "Package"
needs = ["test"]
[[epics.stories]]
key = "tarball"
command = "true"
needs = ["build.compile"]
[[epics.stories]]
key = "sign"
command = "true"
needs = ["tarball"]
"#,
        "example.toml",
    )
    .expect("valid");
    Graph::from_plan(&plan)
}

fn edge_lines<'a>(text: &'a str, arrow: &str) -> Vec<&'a str> {
    text.lines()
        .map(str::trim)
        .filter(|l| l.contains(arrow))
        .collect()
}

#[test]
fn dot_draws_clusters_nodes_and_edges_in_the_direction_of_execution() {
    let dot = example().render(GraphFormat::Dot);
    assert!(dot.starts_with("digraph run {\n"), "{dot}");
    assert!(dot.contains("  label=\"Example plan\";\n"), "{dot}");
    assert!(dot.contains("compound=true;"), "{dot}");
    assert!(
        dot.contains("  subgraph cluster_0 {\n    label=\"Build\";\n"),
        "{dot}"
    );
    assert!(dot.contains("    s2_1 [label=\"sign\"];\n"), "{dot}");
    assert_eq!(
        edge_lines(&dot, "->"),
        [
            "s0_0 -> s0_1;",
            "s0_1 -> s2_0;",
            "s2_0 -> s2_1;",
            "s0_0 -> s1_0 [ltail=cluster_0, lhead=cluster_1];",
            "s1_0 -> s2_0 [ltail=cluster_1, lhead=cluster_2];",
        ]
    );
    assert!(dot.ends_with("}\n"));
}

#[test]
fn mermaid_draws_subgraphs_nodes_and_edges_in_the_direction_of_execution() {
    let mermaid = example().render(GraphFormat::Mermaid);
    assert!(
        mermaid.starts_with("---\ntitle: \"Example plan\"\n---\nflowchart LR\n"),
        "{mermaid}"
    );
    assert!(
        mermaid
            .contains("  subgraph e1 [\"Test\"]\n    s1_0[\"unit\"]\n    s1_1[\"lint\"]\n  end\n"),
        "{mermaid}"
    );
    assert_eq!(
        edge_lines(&mermaid, "-->"),
        [
            "s0_0 --> s0_1",
            "s0_1 --> s2_0",
            "s2_0 --> s2_1",
            "e0 --> e1",
            "e1 --> e2"
        ]
    );
    assert!(
        !mermaid.contains("classDef"),
        "no statuses, no classes: {mermaid}"
    );
}

#[test]
fn an_epic_need_is_one_edge_whatever_the_size_of_the_epics() {
    let mut graph = example();
    for epic in &mut graph.epics {
        let stories = epic.stories.clone();
        for i in 0..50 {
            epic.stories.extend(stories.iter().map(|s| GraphStory {
                key: format!("{}{i}", s.key),
                needs: Vec::new(),
                ..s.clone()
            }));
        }
    }
    let dot = graph.render(GraphFormat::Dot);
    assert_eq!(edge_lines(&dot, "lhead=cluster_1").len(), 1, "{dot}");
    assert_eq!(edge_lines(&dot, "->").len(), 5);
    let mermaid = graph.render(GraphFormat::Mermaid);
    assert_eq!(edge_lines(&mermaid, "-->").len(), 5);
}

#[test]
fn statuses_label_and_colour_the_nodes() {
    let mut graph = example();
    graph.epics[0].status = Some("completed".into());
    graph.epics[0].stories[0].status = Some("completed".into());
    graph.epics[0].stories[1].status = Some("failed".into());
    graph.epics[1].stories[0].status = Some("skipped".into());
    graph.epics[1].stories[1].status = Some("skipped".into());
    graph.epics[2].stories[0].status = Some("something new".into());
    let dot = graph.render(GraphFormat::Dot);
    assert!(
        dot.contains("    label=\"Build\\n(completed)\";\n"),
        "{dot}"
    );
    assert!(
        dot.contains(
            "    s0_1 [label=\"compile\\n(failed)\", style=\"rounded,filled\", \
             fillcolor=\"#f8d0d4\", color=\"#c62828\"];\n"
        ),
        "{dot}"
    );
    assert!(dot.contains("style=\"rounded,filled,dashed\""), "{dot}");
    assert!(
        dot.contains("    s2_0 [label=\"tarball\\n(something new)\"];\n"),
        "{dot}"
    );
    let mermaid = graph.render(GraphFormat::Mermaid);
    assert!(
        mermaid.contains("    s0_1[\"compile<br>(failed)\"]\n"),
        "{mermaid}"
    );
    assert!(
        mermaid.contains("  classDef skipped fill:#f2f2f2,stroke:#a0a0a0,stroke-dasharray:5 5\n  class s1_0,s1_1 skipped\n"),
        "{mermaid}"
    );
    assert!(mermaid.contains("  class s0_0 completed\n"), "{mermaid}");
    assert!(!mermaid.contains("classDef something"), "{mermaid}");
}

const NASTY: &str = "a \"b\" <c> \\ d\n#quot; `e` & {f} [g] |h|; %% end";

fn nasty() -> Graph {
    Graph {
        title: NASTY.into(),
        epics: vec![GraphEpic {
            key: "end".into(),
            title: NASTY.into(),
            status: Some(NASTY.into()),
            needs: vec!["end".into(), "missing".into()],
            stories: vec![GraphStory {
                key: "graph".into(),
                title: NASTY.into(),
                status: None,
                needs: vec![StoryRef {
                    epic: "no".into(),
                    story: "such".into(),
                }],
            }],
        }],
    }
}

#[test]
fn dot_escapes_quotes_backslashes_and_newlines() {
    let dot = nasty().render(GraphFormat::Dot);
    let escaped = "a \\\"b\\\" <c> \\\\ d\\n#quot; `e` & {f} [g] |h|; %% end";
    assert!(dot.contains(&format!("  label=\"{escaped}\";\n")), "{dot}");
    assert!(
        dot.contains(&format!("    s0_0 [label=\"{escaped}\"];\n")),
        "{dot}"
    );
    // Every line but the braces is a statement ending in ';' with balanced quotes.
    for line in dot.lines() {
        let unescaped_quotes = line.replace("\\\\", "").replace("\\\"", "");
        assert_eq!(unescaped_quotes.matches('"').count() % 2, 0, "{line}");
    }
    // A self-need and an unknown need are not drawn.
    assert_eq!(edge_lines(&dot, "->"), Vec::<&str>::new(), "{dot}");
}

#[test]
fn mermaid_escapes_markup_and_uses_safe_ids() {
    let mermaid = nasty().render(GraphFormat::Mermaid);
    let escaped =
        "a #quot;b#quot; #lt;c#gt; \\ d<br>#35;quot; #96;e#96; #amp; {f} [g] |h|; #37;#37; end";
    assert!(
        mermaid.contains(&format!("    s0_0[\"{escaped}\"]\n")),
        "{mermaid}"
    );
    assert!(
        mermaid.contains("title: \"a \\\"b\\\" <c> \\\\ d #quot; `e` & {f} [g] |h|; %% end\"\n"),
        "{mermaid}"
    );
    for line in mermaid.lines().skip(3) {
        assert!(!line.contains('\n'));
        assert_eq!(line.matches('"').count() % 2, 0, "{line}");
        // Nothing user-written outside the quotes: ids and keywords only.
        let outside: String = line.split('"').step_by(2).collect();
        assert!(
            outside
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || " _[]-,>:#;".contains(c)),
            "{line}"
        );
    }
    assert!(!mermaid.contains("end["), "{mermaid}");
    assert_eq!(edge_lines(&mermaid, "-->"), Vec::<&str>::new(), "{mermaid}");
    // Keys that are Mermaid keywords (`end`, `graph`) never become ids: edges use positions.
    let mut graph = nasty();
    graph.epics[0].stories.push(GraphStory {
        key: "x".into(),
        title: "x".into(),
        status: None,
        needs: vec![StoryRef {
            epic: "end".into(),
            story: "graph".into(),
        }],
    });
    assert!(
        graph
            .render(GraphFormat::Mermaid)
            .contains("\n  s0_0 --> s0_1\n")
    );
}

#[test]
fn formats_parse_and_display() {
    assert_eq!("dot".parse::<GraphFormat>(), Ok(GraphFormat::Dot));
    assert_eq!("Mermaid".parse::<GraphFormat>(), Ok(GraphFormat::Mermaid));
    assert_eq!(GraphFormat::Mermaid.to_string(), "mermaid");
    assert_eq!(GraphFormat::Dot.to_string(), "dot");
    let err = "svg".parse::<GraphFormat>().expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "unknown graph format \"svg\" (expected \"dot\" or \"mermaid\")"
    );
}
