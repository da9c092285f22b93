//! Tests of `needs` and `fail_fast`.

use super::*;

use super::tests::problems;

fn story_ref(epic: &str, story: &str) -> StoryRef {
    StoryRef {
        epic: epic.into(),
        story: story.into(),
    }
}

#[test]
fn a_valid_plan_with_every_kind_of_need() {
    let plan = Plan::parse(
        r#"
name = "p"
fail_fast = true
[[epics]]
key = "build"
[[epics.stories]]
key = "compile"
command = "true"
[[epics]]
key = "test"
needs = ["build"]
[[epics.stories]]
key = "lint"
command = "true"
[[epics.stories]]
key = "unit"
command = "true"
needs = ["lint", "build.compile"]
[[epics]]
key = "package"
needs = ["test", "build"]
[[epics.stories]]
key = "tarball"
command = "true"
needs = ["test.unit"]
"#,
        "p.toml",
    )
    .expect("valid");
    assert!(plan.fail_fast);
    assert_eq!(plan.epics[0].needs, Vec::<String>::new());
    assert_eq!(plan.epics[1].needs, ["build"]);
    assert_eq!(plan.epics[2].needs, ["test", "build"]);
    assert_eq!(plan.epics[1].stories[0].needs, []);
    assert_eq!(
        plan.epics[1].stories[1].needs,
        [story_ref("test", "lint"), story_ref("build", "compile")]
    );
    assert_eq!(plan.epics[2].stories[0].needs, [story_ref("test", "unit")]);
    assert_eq!(plan.epics[2].stories[0].needs[0].to_string(), "test.unit");
}

#[test]
fn fail_fast_defaults_to_false_and_must_be_a_boolean() {
    let text = "name='p'\n[[epics]]\nkey='a'\n[[epics.stories]]\nkey='x'\ncommand='true'\n";
    assert!(!Plan::parse(text, "p.toml").expect("valid").fail_fast);
    let got = problems(&format!("fail_fast = 'yes'\n{text}"));
    assert!(got[0].starts_with("1:13: "), "{got:?}");
    assert!(got[0].contains("fail_fast"), "{got:?}");
}

#[test]
fn a_story_need_is_its_own_epic_first_then_the_first_epic_story_split() {
    let plan = Plan::parse(
        r#"
name = "p"
[[epics]]
key = "a"
[[epics.stories]]
key = "b.c"
command = "true"
[[epics]]
key = "a.b"
[[epics.stories]]
key = "c"
command = "true"
[[epics.stories]]
key = "a.b.c"
command = "true"
[[epics.stories]]
key = "x"
command = "true"
needs = ["a.b.c", "c", "a.b.c.x.y"]
[[epics]]
key = "a.b.c.x"
[[epics.stories]]
key = "y"
command = "true"
"#,
        "p.toml",
    )
    .expect("valid");
    assert_eq!(
        plan.epics[1].stories[2].needs,
        [
            story_ref("a.b", "a.b.c"),
            story_ref("a.b", "c"),
            story_ref("a.b.c.x", "y")
        ]
    );
    let plan = Plan::parse(
        "name='p'\n[[epics]]\nkey='a'\n[[epics.stories]]\nkey='b.c'\ncommand='true'\n\
         [[epics]]\nkey='a.b'\n[[epics.stories]]\nkey='c'\ncommand='true'\n\
         [[epics]]\nkey='z'\n[[epics.stories]]\nkey='z'\ncommand='true'\nneeds=['a.b.c']\n",
        "p.toml",
    )
    .expect("valid");
    assert_eq!(plan.epics[2].stories[0].needs, [story_ref("a", "b.c")]);
}

const TWO_EPICS: &str = r#"name = "p"
[[epics]]
key = "build"
[[epics.stories]]
key = "compile"
command = "true"
[[epics]]
key = "test"
[[epics.stories]]
key = "unit"
command = "true"
[[epics.stories]]
key = "lint"
command = "true"
"#;

/// `TWO_EPICS` with `needs` lines after the given lines (1-based, in the original text).
fn with_needs(extra: &[(usize, &str)]) -> String {
    let mut out = String::new();
    for (i, line) in TWO_EPICS.lines().enumerate() {
        out.push_str(line);
        out.push('\n');
        for (after, add) in extra {
            if *after == i + 1 {
                out.push_str(add);
                out.push('\n');
            }
        }
    }
    out
}

#[test]
fn unknown_needs_say_what_was_looked_for() {
    let got = problems(&with_needs(&[
        (3, "needs = [\"tset\"]"),
        (
            10,
            "needs = [\"lnt\", \"build.comple\", \"biuld.compile\", \"x.y.z\"]",
        ),
    ]));
    assert_eq!(
        got,
        [
            "4:10: epics[0].needs[0]: epic \"build\" needs \"tset\", which is not an epic of the plan",
            "12:10: epics[1].stories[0].needs[0]: story \"unit\" in epic \"test\" needs \"lnt\", \
             which is not a story of epic \"test\"",
            "12:17: epics[1].stories[0].needs[1]: story \"unit\" in epic \"test\" needs \
             \"build.comple\", which is not a story of epic \"test\", and epic \"build\" has no \
             story \"comple\"",
            "12:33: epics[1].stories[0].needs[2]: story \"unit\" in epic \"test\" needs \
             \"biuld.compile\", which is not a story of epic \"test\", and there is no epic \
             \"biuld\"",
            "12:50: epics[1].stories[0].needs[3]: story \"unit\" in epic \"test\" needs \"x.y.z\", \
             which is not a story of epic \"test\", and there is no epic \"x\" or \"x.y\"",
        ]
    );
}

#[test]
fn needing_itself_is_refused() {
    let got = problems(&with_needs(&[
        (3, "needs = [\"build\"]"),
        (13, "needs = [\"lint\", \"test.lint\"]"),
    ]));
    assert_eq!(
        got,
        [
            "4:10: epics[0].needs[0]: epic \"build\" needs itself",
            "15:10: epics[1].stories[1].needs[0]: story \"lint\" in epic \"test\" needs itself",
            "15:18: epics[1].stories[1].needs[1]: story \"lint\" in epic \"test\" needs itself",
        ]
    );
}

#[test]
fn a_need_twice_in_one_list_is_refused() {
    let got = problems(&with_needs(&[
        (7, "needs = [\"build\", \"build\"]"),
        (
            13,
            "needs = [\"unit\", \"unit\", \"test.unit\", \"build.compile\"]",
        ),
    ]));
    assert_eq!(
        got,
        [
            "8:19: epics[1].needs[1]: epic \"test\" needs \"build\" twice",
            "15:18: epics[1].stories[1].needs[1]: story \"lint\" in epic \"test\" needs \"unit\" twice",
            "15:26: epics[1].stories[1].needs[2]: story \"lint\" in epic \"test\" needs \
             \"test.unit\" twice (first as \"unit\")",
        ]
    );
}

#[test]
fn a_cycle_of_stories_is_spelled_in_the_direction_of_needs() {
    let got = problems(&with_needs(&[
        (10, "needs = [\"lint\"]"),
        (13, "needs = [\"unit\"]"),
    ]));
    assert_eq!(
        got,
        [
            "11:10: epics[1].stories[0].needs[0]: story \"unit\" in epic \"test\" needs \"lint\", \
          a cycle: test.unit -> test.lint -> test.unit"
        ]
    );
}

#[test]
fn a_cycle_through_an_epic_need_is_reported() {
    // test needs build; build.compile needs test.unit.
    let got = problems(&with_needs(&[
        (5, "needs = [\"test.unit\"]"),
        (7, "needs = [\"build\"]"),
    ]));
    assert_eq!(
        got,
        [
            "6:10: epics[0].stories[0].needs[0]: story \"compile\" in epic \"build\" needs \
          \"test.unit\", a cycle: build.compile -> test.unit -> build -> build.compile"
        ]
    );
    // The same cycle, its epic need first in the file.
    let got = problems(&with_needs(&[
        (3, "needs = [\"test\"]"),
        (10, "needs = [\"build.compile\"]"),
    ]));
    assert_eq!(
        got,
        [
            "4:10: epics[0].needs[0]: epic \"build\" needs \"test\", a cycle: \
          build.compile -> test -> test.unit -> build.compile"
        ]
    );
}

#[test]
fn a_cycle_of_epic_needs_names_the_epics() {
    let got = problems(&with_needs(&[
        (3, "needs = [\"test\"]"),
        (7, "needs = [\"build\"]"),
    ]));
    assert_eq!(
        got,
        ["4:10: epics[0].needs[0]: epic \"build\" needs \"test\", a cycle: build -> test -> build"]
    );
}

#[test]
fn every_cycle_is_reported_once_and_a_self_need_is_not_a_cycle() {
    let text = r#"name = "p"
[[epics]]
key = "a"
needs = ["b", "a"]
[[epics.stories]]
key = "x"
command = "true"
needs = ["y"]
[[epics.stories]]
key = "y"
command = "true"
needs = ["x", "y"]
[[epics]]
key = "b"
needs = ["a"]
[[epics.stories]]
key = "x"
command = "true"
[[epics]]
key = "c"
[[epics.stories]]
key = "p"
command = "true"
needs = ["q", "nope"]
[[epics.stories]]
key = "q"
command = "true"
needs = ["r"]
[[epics.stories]]
key = "r"
command = "true"
needs = ["p"]
"#;
    assert_eq!(
        problems(text),
        [
            "4:10: epics[0].needs[0]: epic \"a\" needs \"b\", a cycle: a -> b -> a",
            "4:15: epics[0].needs[1]: epic \"a\" needs itself",
            "12:15: epics[0].stories[1].needs[1]: story \"y\" in epic \"a\" needs itself",
            "24:10: epics[2].stories[0].needs[0]: story \"p\" in epic \"c\" needs \"q\", a cycle: \
             c.p -> c.q -> c.r -> c.p",
            "24:15: epics[2].stories[0].needs[1]: story \"p\" in epic \"c\" needs \"nope\", which \
             is not a story of epic \"c\"",
        ]
    );
}

#[test]
fn ten_thousand_stories_with_a_long_chain_and_an_epic_need() {
    let mut text = String::from("name = \"big\"\n");
    for (e, key) in ["first", "second"].iter().enumerate() {
        text.push_str(&format!("[[epics]]\nkey = \"{key}\"\n"));
        if e == 1 {
            text.push_str("needs = [\"first\"]\n");
        }
        for j in 0..5000 {
            text.push_str(&format!(
                "[[epics.stories]]\nkey = \"s{j}\"\ncommand = \"true\"\n"
            ));
            if j > 0 {
                text.push_str(&format!("needs = [\"s{}\"]\n", j - 1));
            } else if e == 1 {
                text.push_str("needs = [\"first.s4999\"]\n");
            }
        }
    }
    let plan = Plan::parse(&text, "big.toml").expect("valid");
    assert_eq!(plan.story_count(), 10_000);
    assert_eq!(plan.epics[1].needs, ["first"]);
    assert_eq!(
        plan.epics[1].stories[0].needs,
        [story_ref("first", "s4999")]
    );

    // Back to the first epic from the second: the shortest cycle goes through the epic need.
    let back = text.replacen(
        "key = \"s0\"\ncommand = \"true\"\n",
        "key = \"s0\"\ncommand = \"true\"\nneeds = [\"second.s4999\"]\n",
        1,
    );
    assert_eq!(
        problems(&back),
        [
            "7:10: epics[0].stories[0].needs[0]: story \"s0\" in epic \"first\" needs \
          \"second.s4999\", a cycle: first.s0 -> second.s4999 -> first -> first.s0"
        ]
    );

    // Closing the chain of the first epic into a loop: one problem, the whole chain spelled.
    let looped = text.replacen(
        "key = \"s0\"\ncommand = \"true\"\n",
        "key = \"s0\"\ncommand = \"true\"\nneeds = [\"s4999\"]\n",
        1,
    );
    let got = problems(&looped);
    assert_eq!(got.len(), 1, "{}", got.join("\n"));
    let chain: Vec<String> = std::iter::once(0)
        .chain((1..5000).rev())
        .chain(std::iter::once(0))
        .map(|j| format!("first.s{j}"))
        .collect();
    assert_eq!(
        got[0],
        format!(
            "7:10: epics[0].stories[0].needs[0]: story \"s0\" in epic \"first\" needs \
             \"s4999\", a cycle: {}",
            chain.join(" -> ")
        )
    );
}
