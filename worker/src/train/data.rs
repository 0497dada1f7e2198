//! Fine-tuning data: JSONL files in OpenAI's two fine-tuning formats, turned into token
//! sequences with a next-token target per position.
//!
//! - Chat, `{"messages": [{"role", "content", "weight"?}, ...]}`: rendered with the model's chat
//!   template; the model learns the assistant turns (those without `weight: 0`) and nothing else.
//! - Prompt/completion, `{"prompt", "completion"}`: the model learns the completion and an EOS.
//!
//! Fields this loader does not know (`tool_calls`, `name`, `tools`, ...) are refused rather than
//! ignored: dropping them would train the model on something other than what the file says.

use std::path::Path;

use serde_json::{Map, Value};
use tandem_proto::contract::CHAT_ROLES;

use crate::error::{Error, Result};
use crate::tokenizer::{ChatMessage, TextTokenizer};

/// The target of a position that carries no loss (PyTorch's `ignore_index` convention).
pub const IGNORE: i32 = -100;

/// One training sequence: the tokens fed to the model, and for each position the token the
/// model must predict there (the next token), or -100 where that position carries no loss.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Example {
    pub tokens: Vec<u32>,
    pub targets: Vec<i32>,
}

impl Example {
    /// Positions that contribute to the loss (what the loss is averaged over).
    pub fn loss_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

/// Reads a JSONL training file. Blank lines are skipped. Errors name the file, the 1-based line and the field.
pub fn load_jsonl(path: &Path, tokenizer: &TextTokenizer, max_seq_len: usize) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for_each_line(path, |line| {
        examples.push(parse_example(line, tokenizer, max_seq_len)?);
        Ok(())
    })?;
    Ok(examples)
}

/// Checks a JSONL training file's form without a tokenizer (what the gateway does on upload:
/// a file serves any base model): every line a valid example in one of the two formats.
/// Returns the number of examples. It reads a line at a time: an upload is checked on disk.
pub fn check_jsonl(path: &Path) -> Result<u64> {
    let mut examples = 0;
    for_each_line(path, |line| {
        check_example(line)?;
        examples += 1;
        Ok(())
    })?;
    Ok(examples)
}

/// Calls `f` on each non-blank line of the file at `path`, read a line at a time; an error
/// becomes an [`Error::Data`] that names the file and the 1-based line. An empty file is an
/// error.
fn for_each_line(path: &Path, mut f: impl FnMut(&str) -> Result<()>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(Error::io(path))?;
    let error = |line, msg| Error::Data { path: path.to_path_buf(), line, msg };
    let mut any = false;
    // Lines are split as bytes so that text which is not UTF-8 is reported with its line number.
    for (index, line) in std::io::BufRead::split(std::io::BufReader::new(file), b'\n').enumerate() {
        let line = line.map_err(Error::io(path))?;
        // Editors on Windows may start the file with a byte-order mark, which is not JSON.
        let line = if index == 0 { line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&line) } else { &line };
        let line = std::str::from_utf8(line).map_err(|e| error(index + 1, format!("not UTF-8 text: {e}")))?;
        if !line.trim().is_empty() {
            f(line).map_err(|e| match e {
                Error::InvalidRequest(msg) => error(index + 1, msg),
                other => error(index + 1, other.to_string()),
            })?;
            any = true;
        }
    }
    if !any {
        return Err(error(0, "no training examples (the file is empty)".into()));
    }
    Ok(())
}

/// The checks of [`parse_example`] that need no tokenizer.
fn check_example(line: &str) -> Result<()> {
    let object = json_object(line)?;
    if object.contains_key("messages") {
        parse_messages(&object).map(drop)
    } else if object.contains_key("prompt") || object.contains_key("completion") {
        prompt_completion(&object).map(drop)
    } else {
        Err(bad(FORMATS))
    }
}

const FORMATS: &str = "expected `messages` (chat format) or `prompt` and `completion`";

/// A line that is not a valid example; the message names the field.
fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidRequest(msg.into())
}

fn json_object(line: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON: {e}")))? {
        Value::Object(object) => Ok(object),
        value => Err(bad(format!("expected a JSON object, got {}", describe(&value)))),
    }
}

/// Parses one JSONL line (used by load_jsonl). A line that is not a valid example is an
/// [`Error::InvalidRequest`] naming the field; a tokenizer that fails is its own error.
pub fn parse_example(line: &str, tokenizer: &TextTokenizer, max_seq_len: usize) -> Result<Example> {
    let object = json_object(line)?;
    let sequence = if object.contains_key("messages") {
        chat_sequence(&object, tokenizer)?
    } else if object.contains_key("prompt") || object.contains_key("completion") {
        completion_sequence(&object, tokenizer)?
    } else {
        return Err(bad(FORMATS));
    };
    sequence.into_example(max_seq_len)
}

/// Tokens, each marked with whether the model learns to produce it.
#[derive(Default)]
struct Sequence {
    tokens: Vec<u32>,
    loss: Vec<bool>,
}

impl Sequence {
    fn push(&mut self, tokens: &[u32], loss: bool) {
        self.tokens.extend_from_slice(tokens);
        self.loss.resize(self.tokens.len(), loss);
    }

    /// Appends `text` tokenized on its own. Special tokens in it (`<|im_start|>`) are recognized;
    /// none are added, as chat-template text already holds them.
    fn push_text(&mut self, tokenizer: &TextTokenizer, text: &str, loss: bool) -> Result<()> {
        self.push(&tokenizer.encode(text, false)?, loss);
        Ok(())
    }

    /// Shifts the marks onto targets: position i predicts token i + 1, so a loss token at the very
    /// start (nothing before it) cannot be learned, and the last position has no target.
    fn into_example(self, max_seq_len: usize) -> Result<Example> {
        let len = self.tokens.len();
        if len > max_seq_len {
            return Err(bad(format!("{len} tokens, longer than the maximum sequence length {max_seq_len}")));
        }
        let next = self.tokens.iter().zip(&self.loss).skip(1);
        let mut targets = next
            .map(|(&id, &loss)| {
                if loss {
                    i32::try_from(id).map_err(|_| bad(format!("token id {id} does not fit a target")))
                } else {
                    Ok(IGNORE)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        targets.extend((len > 0).then_some(IGNORE));
        let example = Example { tokens: self.tokens, targets };
        if example.loss_tokens() == 0 {
            return Err(bad("no token carries loss, so there is nothing to learn"));
        }
        Ok(example)
    }
}

/// Renders the conversation once per assistant turn, without and with that turn, so each turn's
/// text is the difference; tokenizing piece by piece then knows which tokens are the assistant's.
fn chat_sequence(object: &Map<String, Value>, tokenizer: &TextTokenizer) -> Result<Sequence> {
    let (messages, learn) = parse_messages(object)?;
    // A template that cannot render these messages (or none at all) makes the example unusable
    // with this model.
    let render = |count: usize, add_generation_prompt: bool| {
        (tokenizer.apply_chat_template(&messages[..count], &[], add_generation_prompt))
            .map_err(|e| bad(format!("`messages`: {e}")))
    };
    let mut sequence = Sequence::default();
    let mut rendered = String::new();
    // Appends what `text` adds to the conversation rendered so far, which it must extend.
    let mut append = |text: String, loss: bool| {
        let piece = text.strip_prefix(rendered.as_str()).ok_or_else(|| {
            bad("`messages`: the chat template does not render the conversation incrementally, so the \
                 assistant turns cannot be told apart from the rest")
        })?;
        sequence.push_text(tokenizer, piece, loss)?;
        rendered = text;
        Ok::<_, Error>(())
    };
    for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
        append(render(i, true)?, false)?;
        append(render(i + 1, false)?, learn[i])?;
    }
    append(render(messages.len(), false)?, false)?;
    Ok(sequence)
}

/// A chat example's messages, and whether each one's text carries loss.
fn parse_messages(object: &Map<String, Value>) -> Result<(Vec<ChatMessage>, Vec<bool>)> {
    only_fields(object, &["messages"], "")?;
    let list = match object.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        other => return Err(wrong("messages", "a non-empty array of messages", other)),
    };
    let (messages, learn): (Vec<ChatMessage>, Vec<bool>) =
        list.iter().enumerate().map(|(i, m)| parse_message(i, m)).collect::<Result<_>>()?;
    if !learn.contains(&true) {
        return Err(bad("`messages`: no assistant message to learn from (none, or all with weight 0)"));
    }
    Ok((messages, learn))
}

/// One message and whether its text carries loss.
fn parse_message(index: usize, value: &Value) -> Result<(ChatMessage, bool)> {
    let path = format!("messages[{index}]");
    let Value::Object(message) = value else {
        return Err(wrong(&path, "an object with `role` and `content`", Some(value)));
    };
    only_fields(message, &["role", "content", "weight"], &format!("{path}."))?;
    let role = match message.get("role") {
        Some(Value::String(role)) if CHAT_ROLES.contains(&role.as_str()) => role,
        other => return Err(wrong(&format!("{path}.role"), &format!("one of {}", CHAT_ROLES.join(", ")), other)),
    };
    let Some(Value::String(content)) = message.get("content") else {
        return Err(wrong(&format!("{path}.content"), "a string", message.get("content")));
    };
    let assistant = role == "assistant";
    let learn = match message.get("weight") {
        None => assistant,
        Some(_) if !assistant => return Err(bad(format!("`{path}.weight`: only assistant messages take a weight"))),
        Some(weight) => match weight.as_u64() {
            Some(0) => false,
            Some(1) => true,
            _ => return Err(wrong(&format!("{path}.weight"), "0 or 1", Some(weight))),
        },
    };
    Ok((ChatMessage::new(role.as_str(), content.as_str()), learn))
}

/// The prompt (with the tokenizer's usual special tokens, as at inference), then the completion
/// and an EOS, which teaches the model to stop; a tokenizer with no EOS gets none.
fn completion_sequence(object: &Map<String, Value>, tokenizer: &TextTokenizer) -> Result<Sequence> {
    let (prompt, completion) = prompt_completion(object)?;
    let mut sequence = Sequence::default();
    sequence.push(&tokenizer.encode(prompt, true)?, false);
    sequence.push_text(tokenizer, completion, true)?;
    if let Some(&eos) = tokenizer.eos_token_ids().first() {
        sequence.push(&[eos], true);
    }
    Ok(sequence)
}

/// A prompt/completion example's two texts.
fn prompt_completion(object: &Map<String, Value>) -> Result<(&str, &str)> {
    only_fields(object, &["prompt", "completion"], "")?;
    let text = |field: &str| match object.get(field) {
        Some(Value::String(text)) => Ok(text.as_str()),
        other => Err(wrong(field, "a string", other)),
    };
    let (prompt, completion) = (text("prompt")?, text("completion")?);
    if completion.is_empty() {
        return Err(bad("`completion`: empty, so there is nothing to learn"));
    }
    Ok((prompt, completion))
}

/// Refuses fields outside `known`; `prefix` is the path of the object holding them.
fn only_fields(object: &Map<String, Value>, known: &[&str], prefix: &str) -> Result<()> {
    match object.keys().find(|key| !known.contains(&key.as_str())) {
        Some(key) => Err(bad(format!("`{prefix}{key}`: unsupported field (expected only {})", known.join(", ")))),
        None => Ok(()),
    }
}

/// The error for `field` holding `value` (or missing) where `expected` was wanted.
fn wrong(field: &str, expected: &str, value: Option<&Value>) -> Error {
    bad(match value {
        None => format!("`{field}`: missing, expected {expected}"),
        Some(value) => format!("`{field}`: expected {expected}, got {}", describe(value)),
    })
}

/// A short description of a JSON value for an error message: scalars as JSON (cut to 40
/// characters, so one huge field does not flood the log), containers by kind.
fn describe(value: &Value) -> String {
    match value {
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
        scalar => {
            let text = scalar.to_string();
            match text.char_indices().nth(40) {
                Some((cut, _)) => format!("{}...", &text[..cut]),
                None => text,
            }
        }
    }
}
