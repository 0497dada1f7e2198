//! TextTokenizer: loading, round trips, chat templates, EOS ids, streaming detokenization.

// A failed call is a failed test; helpers outside `#[test]` fns unwrap too.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use serde_json::json;
use tandem_proto::v1::ToolCall;
use tandem_worker::Error;
use tandem_worker::init_model::write_tokenizer;
use tandem_worker::tokenizer::{ChatMessage, DecodeStream, TextTokenizer};

/// A model directory holding the tokenizer files `init_model` writes.
fn model_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tokenizer").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    write_tokenizer(&dir, 512).unwrap();
    dir
}

/// Rewrites tokenizer_config.json with `edit` applied.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("tokenizer_config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
}

fn conversation() -> Vec<ChatMessage> {
    vec![
        ChatMessage::new("system", "You are a helpful assistant."),
        ChatMessage::new("user", "Hello!"),
        ChatMessage::new("assistant", "Hi there."),
        ChatMessage::new("user", "What is 2+2?"),
    ]
}

#[test]
fn encode_decode_round_trip() {
    let dir = model_dir("round-trip");
    let tok = TextTokenizer::load(&dir).unwrap();
    for text in ["The quick brown fox jumps over the lazy dog.", "  leading spaces\n\ttabs", "naïve café 🚀 日本語", ""]
    {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    assert!(tok.vocab_size() >= 300);
    // Special tokens are single ids, and skipping them removes them from the text.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
    assert!(matches!(tok.decode(&[u32::MAX], false), Err(Error::Tokenizer(_))));
}

#[test]
fn chatml_template_with_and_without_generation_prompt() {
    let dir = model_dir("chatml");
    let tok = TextTokenizer::load(&dir).unwrap();
    assert!(tok.has_chat_template());
    let expected = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n\
                    <|im_start|>assistant\nHi there.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n";
    assert_eq!(tok.apply_chat_template(&conversation(), &[], false).unwrap(), expected);
    assert_eq!(
        tok.apply_chat_template(&conversation(), &[], true).unwrap(),
        format!("{expected}<|im_start|>assistant\n")
    );
}

/// Llama 3's template (trimmed of tool handling): `bos_token`, `.strip()`, whitespace control
/// that relies on trim_blocks/lstrip_blocks.
const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

#[test]
fn llama3_style_template_uses_bos_token() {
    let dir = model_dir("llama3");
    edit_config(&dir, |c| {
        c["chat_template"] = json!(LLAMA3_TEMPLATE);
        c["bos_token"] = json!({"content": "<|endoftext|>", "lstrip": false, "__type": "AddedToken"});
    });
    let tok = TextTokenizer::load(&dir).unwrap();
    let messages = [ChatMessage::new("user", "  Hi  ")];
    assert_eq!(
        tok.apply_chat_template(&messages, &[], true).unwrap(),
        "<|endoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

/// Blocks on their own lines, `.strip()` (pycompat), `raise_exception` and `tojson`, in the
/// Jinja2 whitespace mode transformers uses.
const MULTILINE_TEMPLATE: &str = "{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant'] %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
    {% if message.role == 'user' %}
[INST] {{ message.content.strip() }} [/INST]
    {% else %}
{{ message.content | tojson }}{{ eos_token }}
    {% endif %}
{%- endfor %}";

#[test]
fn template_whitespace_pycompat_tojson_and_raise_exception() {
    let dir = model_dir("multiline");
    edit_config(&dir, |c| c["chat_template"] = json!(MULTILINE_TEMPLATE));
    let tok = TextTokenizer::load(&dir).unwrap();
    let messages = [ChatMessage::new("user", "  Hi there  "), ChatMessage::new("assistant", "Sure <b>\"ok\"</b>")];
    // Jinja2 with trim_blocks + lstrip_blocks renders exactly this.
    assert_eq!(
        tok.apply_chat_template(&messages, &[], false).unwrap(),
        "[INST] Hi there [/INST]\n\"Sure <b>\\\"ok\\\"</b>\"<|im_end|>\n"
    );
    let err = tok.apply_chat_template(&[ChatMessage::new("system", "x")], &[], false).unwrap_err();
    assert!(matches!(&err, Error::InvalidRequest(m) if m.contains("Only user and assistant roles")), "{err}");
}

#[test]
fn template_list_form_picks_default() {
    let dir = model_dir("list-form");
    edit_config(&dir, |c| {
        c["chat_template"] = json!([
            {"name": "tool_use", "template": "TOOLS"},
            {"name": "default", "template": "{{ messages[0]['content'] }}"},
        ])
    });
    let tok = TextTokenizer::load(&dir).unwrap();
    assert_eq!(tok.apply_chat_template(&conversation(), &[], false).unwrap(), "You are a helpful assistant.");
}

#[test]
fn missing_chat_template_is_a_clear_error() {
    let dir = model_dir("no-template");
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("chat_template");
    });
    let tok = TextTokenizer::load(&dir).unwrap();
    assert!(!tok.has_chat_template());
    let err = tok.apply_chat_template(&conversation(), &[], true).unwrap_err().to_string();
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn broken_template_fails_chat_only() {
    let dir = model_dir("broken-template");
    edit_config(&dir, |c| c["chat_template"] = json!("{% for m in messages %}{{ m.content }"));
    let tok = TextTokenizer::load(&dir).unwrap();
    assert!(!tok.encode("ok", false).unwrap().is_empty());
    let err = tok.apply_chat_template(&conversation(), &[], false).unwrap_err().to_string();
    assert!(err.contains("tokenizer_config.json"), "{err}");
}

#[test]
fn standalone_chat_template_file_takes_precedence() {
    let dir = model_dir("jinja-file");
    std::fs::write(dir.join("chat_template.jinja"), "{{ messages | length }} messages").unwrap();
    let tok = TextTokenizer::load(&dir).unwrap();
    assert_eq!(tok.apply_chat_template(&conversation(), &[], false).unwrap(), "4 messages");
}

#[test]
fn missing_tokenizer_json_names_the_file() {
    let dir = model_dir("missing");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = TextTokenizer::load(&dir).err().unwrap();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn broken_tokenizer_json_names_the_file() {
    let dir = model_dir("broken");
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 42").unwrap();
    let err = TextTokenizer::load(&dir).err().unwrap();
    assert!(matches!(err, Error::Format(_)));
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn broken_tokenizer_config_names_the_file() {
    let dir = model_dir("broken-config");
    std::fs::write(dir.join("tokenizer_config.json"), "not json").unwrap();
    let err = TextTokenizer::load(&dir).err().unwrap();
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn eos_ids_come_from_all_configs() {
    let dir = model_dir("eos");
    let tok = TextTokenizer::load(&dir).unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(tok.eos_token_ids(), vec![im_end]);
    std::fs::write(dir.join("generation_config.json"), json!({"eos_token_id": [im_end, eot]}).to_string()).unwrap();
    std::fs::write(dir.join("config.json"), json!({"eos_token_id": 7}).to_string()).unwrap();
    let tok = TextTokenizer::load(&dir).unwrap();
    assert_eq!(tok.eos_token_ids(), vec![im_end, eot, 7]);
    std::fs::write(dir.join("config.json"), json!({"eos_token_id": "x"}).to_string()).unwrap();
    let err = TextTokenizer::load(&dir).err().unwrap().to_string();
    assert!(err.contains("config.json") && err.contains("eos_token_id"), "{err}");
}

#[test]
fn add_bos_token_prepends_bos_once() {
    let dir = model_dir("add-bos");
    edit_config(&dir, |c| c["add_bos_token"] = json!(true));
    let tok = TextTokenizer::load(&dir).unwrap();
    let bos = tok.bos_token_id().unwrap();
    let ids = tok.encode("hi", true).unwrap();
    assert_eq!(ids[0], bos);
    assert_ne!(tok.encode("hi", false).unwrap()[0], bos);
    assert_eq!(tok.encode("<|endoftext|>hi", true).unwrap().iter().filter(|&&i| i == bos).count(), 1);
}

#[test]
fn decode_stream_matches_full_decode_and_never_splits_characters() {
    let dir = model_dir("stream");
    let tok = TextTokenizer::load(&dir).unwrap();
    let text = "Streaming naïve text with 🚀 emoji, 日本語 and <|im_end|> special tokens.";
    let ids = tok.encode(text, false).unwrap();
    for skip_special in [false, true] {
        let mut stream = DecodeStream::new(skip_special);
        let mut streamed = String::new();
        for n in 1..=ids.len() {
            let chunk = stream.step(&tok, &ids[..n]).unwrap();
            assert!(!chunk.contains('\u{FFFD}'), "chunk {chunk:?} splits a character");
            streamed.push_str(&chunk);
        }
        streamed.push_str(&stream.finish(&tok, &ids).unwrap());
        assert_eq!(streamed, tok.decode(&ids, skip_special).unwrap());
    }
}

#[test]
fn decode_stream_holds_back_partial_utf8_until_complete() {
    let dir = model_dir("stream-bytes");
    let tok = TextTokenizer::load(&dir).unwrap();
    // A rare 4-byte character is not a merge: it encodes as one id per byte.
    let ids = tok.encode("🦀", false).unwrap();
    assert_eq!(ids.len(), 4);
    let mut stream = DecodeStream::new(false);
    for n in 1..4 {
        assert_eq!(stream.step(&tok, &ids[..n]).unwrap(), "");
    }
    assert_eq!(stream.step(&tok, &ids).unwrap(), "🦀");
    // An incomplete tail is flushed (as U+FFFD) at the end of generation.
    let mut stream = DecodeStream::new(false);
    assert_eq!(stream.step(&tok, &ids[..2]).unwrap(), "");
    assert_eq!(stream.finish(&tok, &ids[..2]).unwrap(), "\u{FFFD}");
    assert!(stream.step(&tok, &ids[..1]).is_err());
}

#[test]
fn text_tokenizer_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TextTokenizer>();
}

/// Conversations with tools and calls render as transformers renders them with the same
/// template (`tools/oracle/make_chat_fixtures.py`); calls arrive with their arguments as text,
/// as OpenAI's clients send them.
#[test]
fn tools_and_calls_render_as_transformers_renders_them() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/oracle/fixtures/chat_tools.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        fixture["template"].as_str().unwrap(),
        tandem_worker::init_model::CHATML_TEMPLATE,
        "the template changed: rerun tools/oracle/make_chat_fixtures.py"
    );
    let tok = TextTokenizer::load(&model_dir("tools")).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = (case["messages"].as_array().unwrap().iter())
            .map(|m| {
                let tool_calls = (m["tool_calls"].as_array().into_iter().flatten())
                    .map(|c| ToolCall {
                        id: c["id"].as_str().unwrap().into(),
                        name: c["function"]["name"].as_str().unwrap().into(),
                        arguments: c["function"]["arguments"].to_string(),
                    })
                    .collect();
                ChatMessage {
                    tool_calls,
                    tool_call_id: m["tool_call_id"].as_str().unwrap_or_default().into(),
                    ..ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap())
                }
            })
            .collect();
        let tools = case["tools"].as_array().cloned().unwrap_or_default();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        assert_eq!(tok.apply_chat_template(&messages, &tools, add).unwrap(), case["text"].as_str().unwrap());
    }
}
