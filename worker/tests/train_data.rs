//! Training data: the chat and prompt/completion JSONL formats, their loss masks, and the
//! errors for bad lines and files.

// A failed call is a failed test; helpers outside `#[test]` fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use serde_json::json;
use tandem_worker::Error;
use tandem_worker::init_model::write_tokenizer;
use tandem_worker::tokenizer::{ChatMessage, TextTokenizer};
use tandem_worker::train::data::{Example, load_jsonl, parse_example};

const MAX: usize = 4096;

fn test_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("train_data")
}

/// A tokenizer loaded from a model directory whose tokenizer files `init_model` wrote, with
/// `edit` applied to tokenizer_config.json.
fn load_tokenizer(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> TextTokenizer {
    let dir = test_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    write_tokenizer(&dir, 512).unwrap();
    let path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    TextTokenizer::load(&dir).unwrap()
}

/// The generated tokenizer (ChatML template, EOS `<|im_end|>`), shared by the tests.
fn tokenizer() -> &'static TextTokenizer {
    static TOKENIZER: OnceLock<TextTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| load_tokenizer("chatml", |_| {}))
}

fn write_file(name: &str, contents: &str) -> PathBuf {
    std::fs::create_dir_all(test_dir()).unwrap();
    let path = test_dir().join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn parse(line: serde_json::Value) -> Example {
    parse_example(&line.to_string(), tokenizer(), MAX).unwrap()
}

/// Checks the invariants every example keeps, and returns the text of each run of consecutive
/// loss-carrying targets.
fn loss_spans(example: &Example) -> Vec<String> {
    let Example { tokens, targets } = example;
    assert_eq!(targets.len(), tokens.len());
    assert_eq!(targets.last(), Some(&-100));
    let mut spans: Vec<Vec<u32>> = Vec::new();
    for (i, &target) in targets.iter().enumerate() {
        if target < 0 {
            assert_eq!(target, -100);
            continue;
        }
        assert_eq!(target as u32, tokens[i + 1], "position {i} must predict the next token");
        match spans.last_mut() {
            Some(span) if i > 0 && targets[i - 1] >= 0 => span.push(target as u32),
            _ => spans.push(vec![target as u32]),
        }
    }
    assert_eq!(spans.iter().map(Vec::len).sum::<usize>(), example.loss_tokens());
    spans.iter().map(|span| tokenizer().decode(span, false).unwrap()).collect()
}

fn chat(messages: &[ChatMessage]) -> String {
    tokenizer().apply_chat_template(messages, &[], false).unwrap()
}

#[test]
fn chat_learns_only_the_assistant_turn() {
    let example = parse(json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there."},
    ]}));
    assert_eq!(loss_spans(&example), ["Hi there.<|im_end|>\n"]);
    let rendered = chat(&[
        ChatMessage::new("system", "You are terse."),
        ChatMessage::new("user", "Hello!"),
        ChatMessage::new("assistant", "Hi there."),
    ]);
    assert_eq!(tokenizer().decode(&example.tokens, false).unwrap(), rendered);
    // Special tokens in the rendered text are single tokens, learned like any other.
    let im_end = tokenizer().token_to_id("<|im_end|>").unwrap();
    assert_eq!(example.targets.iter().filter(|&&t| t == im_end as i32).count(), 1);
    assert!(example.tokens.contains(&tokenizer().token_to_id("<|im_start|>").unwrap()));
}

#[test]
fn chat_multi_turn_skips_weight_zero_and_trailing_text() {
    let example = parse(json!({"messages": [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first", "weight": 0},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second"},
        {"role": "tool", "content": "42"},
        {"role": "assistant", "content": "third", "weight": 1},
        {"role": "user", "content": "thanks"},
    ]}));
    assert_eq!(loss_spans(&example), ["second<|im_end|>\n", "third<|im_end|>\n"]);
    let text = tokenizer().decode(&example.tokens, false).unwrap();
    assert!(text.starts_with("<|im_start|>user\none<|im_end|>\n<|im_start|>assistant\nfirst<|im_end|>\n"));
    assert!(text.ends_with("<|im_start|>user\nthanks<|im_end|>\n"), "{text}");
}

#[test]
fn prompt_completion_learns_the_completion_and_eos() {
    let tok = tokenizer();
    let example = parse(json!({"prompt": "The capital of France is", "completion": " Paris."}));
    let prompt = tok.encode("The capital of France is", true).unwrap();
    let completion = tok.encode(" Paris.", false).unwrap();
    let eos = tok.eos_token_ids()[0];
    assert_eq!(example.tokens, [prompt.clone(), completion.clone(), vec![eos]].concat());
    let mut expected = vec![-100; prompt.len() - 1];
    expected.extend(completion.iter().chain([&eos]).map(|&id| id as i32));
    expected.push(-100);
    assert_eq!(example.targets, expected);
    assert_eq!(loss_spans(&example), [" Paris.<|im_end|>"]);
}

#[test]
fn bad_lines_name_the_line_and_the_field() {
    let good = json!({"prompt": "a", "completion": "b"}).to_string();
    let user = json!({"role": "user", "content": "q"});
    let reply = json!({"role": "assistant", "content": "r"});
    let cases = [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        (r#"{"text": "hi"}"#, "expected `messages` (chat format) or `prompt` and `completion`"),
        (r#"{"messages": "hi"}"#, "`messages`: expected a non-empty array of messages, got \"hi\""),
        (r#"{"messages": []}"#, "`messages`: expected a non-empty array"),
        (&json!({"messages": [user, 7]}).to_string(), "`messages[1]`: expected an object"),
        (
            &json!({"messages": [user, {"role": "bot", "content": "x"}]}).to_string(),
            "`messages[1].role`: expected one of system, developer, user, assistant, tool, got \"bot\"",
        ),
        (&json!({"messages": [{"content": "x"}]}).to_string(), "`messages[0].role`: missing"),
        (&json!({"messages": [{"role": "user"}, reply]}).to_string(), "`messages[0].content`: missing"),
        (
            &json!({"messages": [user, {"role": "assistant", "content": null}]}).to_string(),
            "`messages[1].content`: expected a string, got null",
        ),
        (
            &json!({"messages": [user, {"role": "assistant", "content": "r", "weight": 0.5}]}).to_string(),
            "`messages[1].weight`: expected 0 or 1, got 0.5",
        ),
        (
            &json!({"messages": [{"role": "user", "content": "q", "weight": 1}, reply]}).to_string(),
            "`messages[0].weight`: only assistant messages take a weight",
        ),
        (
            &json!({"messages": [user, {"role": "assistant", "content": "", "tool_calls": []}]}).to_string(),
            "`messages[1].tool_calls`: unsupported field",
        ),
        (&json!({"messages": [reply], "tools": []}).to_string(), "`tools`: unsupported field"),
        (&json!({"messages": [user]}).to_string(), "`messages`: no assistant message"),
        (
            &json!({"messages": [user, {"role": "assistant", "content": "r", "weight": 0}]}).to_string(),
            "`messages`: no assistant message",
        ),
        (r#"{"prompt": "a"}"#, "`completion`: missing, expected a string"),
        (r#"{"completion": "b"}"#, "`prompt`: missing"),
        (r#"{"prompt": 1, "completion": "b"}"#, "`prompt`: expected a string, got 1"),
        (r#"{"prompt": "a", "completion": ""}"#, "`completion`: empty"),
        (r#"{"prompt": "a", "completion": "b", "id": 3}"#, "`id`: unsupported field"),
    ];
    for (i, (line, expected)) in cases.iter().enumerate() {
        // The bad line is the third: line numbers count blank lines too.
        let path = write_file(&format!("bad-{i}.jsonl"), &format!("{good}\n\n{line}\n{good}\n"));
        let err = load_jsonl(&path, tokenizer(), MAX).unwrap_err();
        assert!(matches!(&err, Error::Data { line: 3, msg, .. } if msg.contains(expected)), "{line}: {err}");
        assert!(err.to_string().starts_with(&format!("{}:3: ", path.display())), "{err}");
    }
}

/// The message of a line that is not a valid example (an invalid request, not another kind).
fn invalid(err: Error) -> String {
    match err {
        Error::InvalidRequest(msg) => msg,
        other => panic!("expected an invalid request, got {other:?}"),
    }
}

#[test]
fn too_long_is_an_error() {
    let line = json!({"prompt": "a b c d e f g", "completion": " h i j"}).to_string();
    let len = parse_example(&line, tokenizer(), MAX).unwrap().tokens.len();
    assert_eq!(parse_example(&line, tokenizer(), len).unwrap().tokens.len(), len);
    let err = invalid(parse_example(&line, tokenizer(), len - 1).unwrap_err());
    assert_eq!(err, format!("{len} tokens, longer than the maximum sequence length {}", len - 1));
}

#[test]
fn blank_lines_crlf_and_bom_are_accepted() {
    let chat = json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]});
    let completion = json!({"prompt": "a", "completion": "b"});
    let path = write_file("blank-lines.jsonl", &format!("\u{feff}\n  \n{chat}\r\n\t\n{completion}\n\n"));
    let examples = load_jsonl(&path, tokenizer(), MAX).unwrap();
    assert_eq!(examples, [parse(chat), parse(completion)]);
}

#[test]
fn empty_missing_and_non_utf8_files() {
    for (name, contents) in [("empty.jsonl", ""), ("blank.jsonl", "\n \n\n")] {
        let err = load_jsonl(&write_file(name, contents), tokenizer(), MAX).unwrap_err();
        assert!(matches!(&err, Error::Data { line: 0, msg, .. } if msg.contains("no training examples")), "{err}");
    }
    let err = load_jsonl(&test_dir().join("missing.jsonl"), tokenizer(), MAX).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    let path = test_dir().join("latin1.jsonl");
    std::fs::write(&path, b"{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"caf\xe9\"}\n").unwrap();
    let err = load_jsonl(&path, tokenizer(), MAX).unwrap_err();
    assert!(matches!(&err, Error::Data { line: 2, msg, .. } if msg.contains("UTF-8")), "{err}");
}

#[test]
fn templates_that_cannot_be_split_are_errors() {
    let line = json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]});
    // The message count up front changes the start of the text with every message.
    let counting = load_tokenizer("counting", |c| {
        c["chat_template"] = json!("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    });
    let err = invalid(parse_example(&line.to_string(), &counting, MAX).unwrap_err());
    assert!(err.contains("`messages`: the chat template does not render the conversation incrementally"), "{err}");
    let no_template = load_tokenizer("no-template", |c| {
        c.as_object_mut().unwrap().remove("chat_template");
    });
    let err = invalid(parse_example(&line.to_string(), &no_template, MAX).unwrap_err());
    assert!(err.starts_with("`messages`: ") && err.contains("no chat template"), "{err}");
}

#[test]
fn truncated_and_odd_lines_never_panic() {
    let line = json!({"messages": [
        {"role": "user", "content": "naïve 🚀 <|im_start|>"},
        {"role": "assistant", "content": "ok<|im_end|>", "weight": 1},
    ]})
    .to_string();
    for (cut, _) in line.char_indices() {
        let _ = parse_example(&line[..cut], tokenizer(), MAX);
    }
    let deep = "[".repeat(10_000);
    for odd in ["\0", "null", "\"str\"", "1e999", &deep, r#"{"messages": [{"role": "assistant", "content": ""}]}"#] {
        let _ = parse_example(odd, tokenizer(), MAX);
    }
}
