//! The text side of a model directory: `tokenizer.json` (via the `tokenizers` crate), the
//! special tokens and chat template of `tokenizer_config.json`, and the EOS ids of
//! `generation_config.json` / `config.json`.
//!
//! Chat templates render with minijinja configured the way transformers configures Jinja2
//! (`trim_blocks`, `lstrip_blocks`, `loopcontrols`, `raise_exception`, `tojson`,
//! `strftime_now`, Python string methods through `minijinja_contrib::pycompat`).
//!
//! [`DecodeStream`] turns a growing list of generated ids into text chunks for streaming without
//! splitting multi-byte characters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, Serde, Value as JinjaValue, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde_json::Value as JsonValue;
use tokenizers::Tokenizer;

use tandem_proto::v1::ToolCall;

use crate::error::{Error, Result, read_json};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's calls of tools.
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool message answers (empty for other roles).
    pub tool_call_id: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: String::new() }
    }
}

/// A model's tokenizer and chat template.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// `add_bos_token` of tokenizer_config.json (Llama-style tokenizers); `None` when absent.
    add_bos_token: Option<bool>,
    eos_token_ids: Vec<u32>,
    chat: ChatTemplate,
}

/// The chat template, compiled at load. A broken template does not stop the model from loading
/// (completions still work); it fails chat requests with the compile error.
enum ChatTemplate {
    Missing,
    Invalid(String),
    Ready(Box<Environment<'static>>),
}

const TEMPLATE_NAME: &str = "chat_template";

impl TextTokenizer {
    /// Loads the tokenizer of the model directory `dir`: `tokenizer.json` (required),
    /// `tokenizer_config.json`, `generation_config.json`, `config.json`, and a standalone
    /// `chat_template.jinja` / `chat_template.json` (optional; newer transformers save the
    /// template there, and it then takes precedence over tokenizer_config's).
    pub fn load(dir: &Path) -> Result<Self> {
        let tokenizer = load_tokenizer_json(&dir.join("tokenizer.json"))?;
        let config = read_optional_json(&dir.join("tokenizer_config.json"))?.unwrap_or(JsonValue::Null);
        let bos_token = special_token(&config, "bos_token");
        let eos_token = special_token(&config, "eos_token");
        let add_bos_token = config.get("add_bos_token").and_then(JsonValue::as_bool);
        let template = find_chat_template(dir, &config)?;
        let eos_token_ids = collect_eos_ids(dir, &tokenizer, eos_token.as_deref())?;
        let chat = match template {
            None => ChatTemplate::Missing,
            Some((source, origin)) => match compile_chat_template(source) {
                Ok(env) => ChatTemplate::Ready(Box::new(env)),
                Err(e) => ChatTemplate::Invalid(format!("{}: {}", origin.display(), describe_jinja_error(&e))),
            },
        };
        Ok(TextTokenizer { tokenizer, bos_token, eos_token, add_bos_token, eos_token_ids, chat })
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's post-processor runs (and a
    /// BOS is prepended when tokenizer_config says `add_bos_token: true` and the post-processor
    /// did not add it). Text from [`Self::apply_chat_template`] already holds its special tokens:
    /// encode it with `add_special_tokens = false`, as transformers does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding =
            self.tokenizer.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if add_special_tokens
            && self.add_bos_token == Some(true)
            && let Some(bos) = self.bos_token_id()
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Text of `ids`; ids outside the vocabulary are an error rather than silently dropped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let vocab_size = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(Error::Tokenizer(format!("decode: token id {bad} is outside the vocabulary ({vocab_size})")));
        }
        self.tokenizer.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// Ids that end generation: tokenizer_config's `eos_token`, then generation_config.json's and
    /// config.json's `eos_token_id` (an int or a list), without duplicates, in that order.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_ids.clone()
    }

    /// Tokens in the tokenizer, added tokens included (the model's `vocab_size` may be larger).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.tokenizer.token_to_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        matches!(self.chat, ChatTemplate::Ready(_))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Renders `messages` with the chat template, as transformers' `apply_chat_template(...,
    /// tools=tools, tokenize=False)` does: variables `messages`, `add_generation_prompt`,
    /// `bos_token`, `eos_token`, `tools` (none when empty; else OpenAI's `{"type": "function",
    /// "function": {...}}` objects) and `documents` (none). An exception the template raises
    /// (e.g. roles that do not alternate) is an invalid request.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        tools: &[JsonValue],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let env = match &self.chat {
            ChatTemplate::Ready(env) => env,
            ChatTemplate::Missing => {
                return Err(Error::InvalidRequest(
                    "this model has no chat template (no `chat_template` in tokenizer_config.json and no \
                     chat_template.jinja); use the completions API"
                        .into(),
                ));
            }
            ChatTemplate::Invalid(msg) => {
                return Err(Error::Tokenizer(format!("chat template does not compile: {msg}")));
            }
        };
        let template = env.get_template(TEMPLATE_NAME).map_err(|e| Error::Tokenizer(describe_jinja_error(&e)))?;
        let messages: Vec<JinjaValue> = messages.iter().map(message_value).collect();
        let ctx = BTreeMap::from([
            ("messages", JinjaValue::from(messages)),
            ("add_generation_prompt", JinjaValue::from(add_generation_prompt)),
            ("bos_token", JinjaValue::from(self.bos_token.clone().unwrap_or_default())),
            ("eos_token", JinjaValue::from(self.eos_token.clone().unwrap_or_default())),
            ("tools", if tools.is_empty() { JinjaValue::from(()) } else { JinjaValue::from(Serde(tools)) }),
            ("documents", JinjaValue::from(())),
        ]);
        template.render(ctx).map_err(|e| template_render_error(&e))
    }
}

/// A message as transformers hands it to templates: calls in OpenAI's shape, their arguments
/// an object (templates write them with `tojson`; the text OpenAI's clients send stays text
/// only if it is not JSON), and `tool_call_id` where there is one.
fn message_value(message: &ChatMessage) -> JinjaValue {
    let mut value = serde_json::json!({"role": message.role, "content": message.content});
    if !message.tool_calls.is_empty() {
        let calls: Vec<JsonValue> = (message.tool_calls.iter())
            .map(|c| {
                let arguments = serde_json::from_str(&c.arguments).unwrap_or_else(|_| JsonValue::from(c.arguments.clone()));
                serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}})
            })
            .collect();
        value["tool_calls"] = JsonValue::from(calls);
    }
    if !message.tool_call_id.is_empty() {
        value["tool_call_id"] = JsonValue::from(message.tool_call_id.clone());
    }
    JinjaValue::from(Serde(&value))
}

fn load_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    let bytes = std::fs::read(path).map_err(Error::io(path))?;
    Tokenizer::from_bytes(&bytes).map_err(|e| Error::Format(format!("{}: not a valid tokenizer: {e}", path.display())))
}

/// Parses `path` if it exists; a file that exists but does not parse is an error.
fn read_optional_json(path: &Path) -> Result<Option<JsonValue>> {
    if !path.exists() {
        return Ok(None);
    }
    read_json(path).map(Some)
}

/// A special token of tokenizer_config.json: a string or an AddedToken object `{"content": ...}`.
fn special_token(config: &JsonValue, key: &str) -> Option<String> {
    match config.get(key)? {
        JsonValue::String(s) => Some(s.clone()),
        JsonValue::Object(o) => o.get("content").and_then(JsonValue::as_str).map(str::to_string),
        _ => None,
    }
}

/// The chat template source and the file it came from.
fn find_chat_template(dir: &Path, config: &JsonValue) -> Result<Option<(String, PathBuf)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        let source = std::fs::read_to_string(&jinja).map_err(Error::io(&jinja))?;
        return Ok(Some((source, jinja)));
    }
    let standalone = dir.join("chat_template.json");
    if let Some(json) = read_optional_json(&standalone)? {
        let template = template_from_field(json.get("chat_template"), &standalone)?;
        return Ok(template.map(|t| (t, standalone)));
    }
    let config_path = dir.join("tokenizer_config.json");
    Ok(template_from_field(config.get("chat_template"), &config_path)?.map(|t| (t, config_path)))
}

/// `chat_template` is a string, or HF's list of `{name, template}` from which "default" is used.
fn template_from_field(field: Option<&JsonValue>, path: &Path) -> Result<Option<String>> {
    let format_err = |msg: &str| Error::Json { path: path.to_path_buf(), msg: format!("chat_template: {msg}") };
    match field {
        None | Some(JsonValue::Null) => Ok(None),
        Some(JsonValue::String(s)) => Ok(Some(s.clone())),
        Some(JsonValue::Array(list)) => {
            let named = |entry: &JsonValue| entry.get("name").and_then(JsonValue::as_str) == Some("default");
            let default = list.iter().find(|e| named(e)).ok_or_else(|| format_err("no template named \"default\""))?;
            let template = default.get("template").and_then(JsonValue::as_str);
            template.map(|t| Some(t.to_string())).ok_or_else(|| format_err("the \"default\" entry has no template"))
        }
        Some(_) => Err(format_err("expected a string or a list of {name, template}")),
    }
}

/// EOS ids from every place transformers looks, deduplicated in order.
fn collect_eos_ids(dir: &Path, tokenizer: &Tokenizer, eos_token: Option<&str>) -> Result<Vec<u32>> {
    let mut ids: Vec<u32> = eos_token.and_then(|t| tokenizer.token_to_id(t)).into_iter().collect();
    for file in ["generation_config.json", "config.json"] {
        let path = dir.join(file);
        if let Some(json) = read_optional_json(&path)? {
            ids.extend(eos_ids_field(json.get("eos_token_id"), &path)?);
        }
    }
    let mut unique = Vec::with_capacity(ids.len());
    for id in ids {
        if !unique.contains(&id) {
            unique.push(id);
        }
    }
    Ok(unique)
}

/// `eos_token_id`: absent, null, an int, or a list of ints.
fn eos_ids_field(field: Option<&JsonValue>, path: &Path) -> Result<Vec<u32>> {
    let as_id = |v: &JsonValue| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let bad =
        || Error::Json { path: path.to_path_buf(), msg: "eos_token_id: expected a token id or a list of ids".into() };
    match field {
        None | Some(JsonValue::Null) => Ok(Vec::new()),
        Some(JsonValue::Array(list)) => list.iter().map(|v| as_id(v).ok_or_else(bad)).collect(),
        Some(v) => as_id(v).map(|id| vec![id]).ok_or_else(bad),
    }
}

// ---------------------------------------------------------------------------------------------
// chat template environment

/// An environment holding the template, configured like transformers' Jinja2 sandbox.
fn compile_chat_template(source: String) -> std::result::Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    env.set_syntax(minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(TEMPLATE_NAME, source)?;
    Ok(env)
}

/// Marks an error raised by the template itself (its message is for the user).
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

fn raise_exception(message: String) -> std::result::Result<JinjaValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedByTemplate(message)))
}

fn template_render_error(e: &minijinja::Error) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(raised) = err.downcast_ref::<RaisedByTemplate>() {
            return Error::InvalidRequest(format!("chat template: {}", raised.0));
        }
        source = err.source();
    }
    Error::Tokenizer(format!("rendering the chat template: {}", describe_jinja_error(e)))
}

/// The error with its line, and its cause chain.
fn describe_jinja_error(e: &minijinja::Error) -> String {
    let mut msg = e.to_string();
    if let Some(line) = e.line() {
        let _ = write!(msg, " (line {line})");
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        let _ = write!(msg, ": {err}");
        source = err.source();
    }
    msg
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, which is
/// what transformers' `tojson` does; minijinja's built-in filter escapes `<`, `>`, `&`, `'` for
/// HTML and would change the prompt.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    PyJson { indent, sort_keys: sort_keys.unwrap_or(false) }.write(&mut out, &value, 0)?;
    Ok(out)
}

struct PyJson {
    indent: Option<usize>,
    sort_keys: bool,
}

impl PyJson {
    fn write(&self, out: &mut String, value: &JinjaValue, depth: usize) -> std::result::Result<(), minijinja::Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => write_py_number(out, value),
            ValueKind::String | ValueKind::Plain => write_json_string(out, &value.to_string()),
            ValueKind::Map => {
                let mut keys: Vec<JinjaValue> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                let items = keys.into_iter().map(|k| value.get_item(&k).map(|v| (k, v)));
                let items: Vec<(JinjaValue, JinjaValue)> = items.collect::<std::result::Result<_, _>>()?;
                self.write_container(out, ('{', '}'), items.len(), depth, |out, i| {
                    let (k, v) = &items[i];
                    write_json_string(out, &k.to_string());
                    out.push_str(": ");
                    self.write(out, v, depth + 1)
                })?;
            }
            ValueKind::Seq | ValueKind::Iterable | ValueKind::Bytes => {
                let items: Vec<JinjaValue> = value.try_iter()?.collect();
                self.write_container(out, ('[', ']'), items.len(), depth, |out, i| {
                    self.write(out, &items[i], depth + 1)
                })?;
            }
            ValueKind::Invalid => {
                return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: invalid value"));
            }
            // ValueKind is non-exhaustive; anything new serialises as its string form.
            _ => write_json_string(out, &value.to_string()),
        }
        Ok(())
    }

    /// Python's layout: `[a, b]` inline; with `indent`, one item per line and `,` separators.
    fn write_container(
        &self,
        out: &mut String,
        (open, close): (char, char),
        len: usize,
        depth: usize,
        mut item: impl FnMut(&mut String, usize) -> std::result::Result<(), minijinja::Error>,
    ) -> std::result::Result<(), minijinja::Error> {
        out.push(open);
        for i in 0..len {
            match self.indent {
                Some(indent) => {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    out.push_str(&" ".repeat(indent * (depth + 1)));
                }
                None if i > 0 => out.push_str(", "),
                None => {}
            }
            item(out, i)?;
        }
        if let (Some(indent), true) = (self.indent, len > 0) {
            out.push('\n');
            out.push_str(&" ".repeat(indent * depth));
        }
        out.push(close);
        Ok(())
    }
}

/// Integers as integers; floats as Python's `repr` does (`1.0`, not `1`).
fn write_py_number(out: &mut String, value: &JinjaValue) {
    if value.is_integer() {
        out.push_str(&value.to_string());
        return;
    }
    match f64::try_from(value.clone()) {
        Ok(f) if f.is_finite() => {
            let _ = write!(out, "{f:?}");
        }
        Ok(f) if f.is_nan() => out.push_str("NaN"),
        Ok(f) if f > 0.0 => out.push_str("Infinity"),
        Ok(_) => out.push_str("-Infinity"),
        Err(_) => out.push_str(&value.to_string()),
    }
}

/// A JSON string with only the escapes `ensure_ascii=False` makes: quote, backslash, controls.
fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// transformers' `strftime_now(format)` (Llama 3.x templates print today's date), in UTC, for
/// the directives those templates use: %d %m %Y %y %b %B %a %A %H %M %S %j %%.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {e}")))?
        .as_secs();
    strftime(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Formats the UTC time `unix_secs`.
fn strftime(format: &str, unix_secs: u64) -> std::result::Result<String, minijinja::Error> {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let day_of_year = days - days_before_year(year) + 1;
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = ((days + 3) % 7) as usize;
    let month_name = MONTHS[(month - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('d') => write!(out, "{day:02}"),
            Some('m') => write!(out, "{month:02}"),
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('a') => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            Some('A') => write!(out, "{}", WEEKDAYS[weekday]),
            Some('H') => write!(out, "{:02}", secs_of_day / 3600),
            Some('M') => write!(out, "{:02}", secs_of_day / 60 % 60),
            Some('S') => write!(out, "{:02}", secs_of_day % 60),
            Some('j') => write!(out, "{day_of_year:03}"),
            Some('%') => write!(out, "%"),
            other => {
                let msg = format!("strftime_now: unsupported directive %{}", other.unwrap_or(' '));
                return Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg));
            }
        };
    }
    Ok(out)
}

/// (year, month 1-12, day 1-31) of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Days from 1970-01-01 to January 1st of `year` (>= 1970).
fn days_before_year(year: u64) -> u64 {
    let leaps = |y: u64| y / 4 - y / 100 + y / 400;
    (year - 1970) * 365 + leaps(year - 1) - leaps(1969)
}

// ---------------------------------------------------------------------------------------------
// streaming detokenization

/// Incremental detokenizer for streaming. Each call gets the whole list of generated ids so far
/// and returns the text they add. It decodes a small window (from `prefix_offset`) twice, with
/// and without the ids not yet emitted, and emits the difference, so tokenizers that strip a
/// leading space or merge bytes across tokens still stream exactly the full decode; text ending in
/// U+FFFD (an incomplete UTF-8 sequence) is held back until the next ids complete it.
#[derive(Clone, Debug, Default)]
pub struct DecodeStream {
    skip_special_tokens: bool,
    /// Start of the decode window: the ids before the last emitted chunk's.
    prefix_offset: usize,
    /// Ids before this are already emitted.
    read_offset: usize,
}

impl DecodeStream {
    pub fn new(skip_special_tokens: bool) -> Self {
        DecodeStream { skip_special_tokens, prefix_offset: 0, read_offset: 0 }
    }

    /// The text `ids` adds since the previous call; empty when the new ids do not yet form
    /// complete characters (or decode to nothing, like skipped special tokens).
    pub fn step(&mut self, tokenizer: &TextTokenizer, ids: &[u32]) -> Result<String> {
        self.next_chunk(tokenizer, ids, false)
    }

    /// The remaining text at the end of generation, including an incomplete trailing character
    /// (as U+FFFD, what a full decode gives).
    pub fn finish(&mut self, tokenizer: &TextTokenizer, ids: &[u32]) -> Result<String> {
        self.next_chunk(tokenizer, ids, true)
    }

    fn next_chunk(&mut self, tokenizer: &TextTokenizer, ids: &[u32], flush: bool) -> Result<String> {
        if ids.len() < self.read_offset {
            return Err(Error::Tokenizer(format!(
                "decode stream: {} ids given after {} were already streamed",
                ids.len(),
                self.read_offset
            )));
        }
        if ids.len() == self.read_offset {
            return Ok(String::new());
        }
        let prefix = tokenizer.decode(&ids[self.prefix_offset..self.read_offset], self.skip_special_tokens)?;
        let full = tokenizer.decode(&ids[self.prefix_offset..], self.skip_special_tokens)?;
        if full.len() <= prefix.len() || (!flush && full.ends_with('\u{FFFD}')) {
            return Ok(String::new());
        }
        // A window decode normally extends its prefix; if a tokenizer rewrites earlier text,
        // emit from the same byte offset (as TGI and vLLM do) rather than fail the stream.
        let chunk = match full.strip_prefix(prefix.as_str()) {
            Some(suffix) => suffix.to_string(),
            None => full.get(prefix.len()..).map(str::to_string).unwrap_or_default(),
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = ids.len();
        Ok(chunk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-07-26 13:05:09 UTC, a Friday, day 208.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(strftime("%d %b %Y", t).unwrap(), "26 Jul 2024");
        assert_eq!(strftime("%A %B %j %H:%M:%S %y %m %%", t).unwrap(), "Friday July 208 13:05:09 24 07 %");
        assert!(strftime("%Q", t).is_err());
    }

    #[test]
    fn civil_from_days_handles_leap_years() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(days_before_year(2024), 19_723);
    }

    #[test]
    fn python_json_layout() {
        let value = JinjaValue::from(BTreeMap::from([
            ("a", JinjaValue::from(vec![JinjaValue::from(1), JinjaValue::from(1.5)])),
            ("b", JinjaValue::from("<x>\n\"é\"")),
        ]));
        let mut out = String::new();
        PyJson { indent: None, sort_keys: false }.write(&mut out, &value, 0).unwrap();
        assert_eq!(out, r#"{"a": [1, 1.5], "b": "<x>\n\"é\""}"#);
        let mut out = String::new();
        PyJson { indent: Some(2), sort_keys: true }.write(&mut out, &value, 0).unwrap();
        assert_eq!(out, "{\n  \"a\": [\n    1,\n    1.5\n  ],\n  \"b\": \"<x>\\n\\\"é\\\"\"\n}");
    }
}
