//! Tool calling. The model sees a request's tools through its chat template and calls one by
//! writing `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`: the convention of
//! Hermes' and Qwen2.5's chat templates, which the generated models' template follows too. A
//! grammar holds what it writes to that form and each call to its tool's schema
//! ([`ToolCalling::grammar`]), and a [`CallParser`] takes the calls out of the text as it
//! streams, so that they reach the caller as calls and not as text.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tandem_proto::contract::check_function_name;
use tandem_proto::v1::{GenerateRequest, ToolCall, ToolChoice};

use crate::error::{Error, Result};
use crate::structured::{Grammar, compact};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "\n</tool_call>";

/// A request's tools, and whether and how many it must call.
#[derive(Clone, Debug)]
pub struct ToolCalling {
    /// In the request's order.
    tools: Vec<Function>,
    choice: ToolChoice,
    function: String,
    single: bool,
}

impl ToolCalling {
    /// The request's tool calling, checked; `None` when it gives no tools.
    pub fn of(req: &GenerateRequest) -> Result<Option<Self>> {
        let choice = ToolChoice::try_from(req.tool_choice).map_err(|_| invalid("tool_choice: unknown value"))?;
        if req.tools.is_empty() {
            return match choice {
                ToolChoice::Auto | ToolChoice::None => Ok(None),
                _ => Err(invalid("tool_choice needs tools")),
            };
        }
        if req.messages.is_empty() {
            return Err(invalid("tools are given to chat messages only"));
        }
        if !req.json_schema.is_empty() && choice != ToolChoice::None {
            return Err(invalid("give a JSON schema or tools to call, not both (unless tool_choice is none)"));
        }
        let mut tools: Vec<Function> = Vec::with_capacity(req.tools.len());
        for t in &req.tools {
            check_function_name("tool", &t.name).map_err(|e| invalid(&e.0))?;
            if tools.iter().any(|f| f.name == t.name) {
                return Err(invalid(&format!("tool {:?} is given twice", t.name)));
            }
            let parameters = parameters(&t.name, &t.parameters)?;
            tools.push(Function { name: t.name.clone(), description: t.description.clone(), parameters });
        }
        let function = match choice {
            ToolChoice::Function if !tools.iter().any(|f| f.name == req.tool_function) => {
                return Err(invalid(&format!(
                    "tool_choice names {:?}, which is not among the tools",
                    req.tool_function
                )));
            }
            ToolChoice::Function => req.tool_function.clone(),
            _ => String::new(),
        };
        Ok(Some(ToolCalling { tools, choice, function, single: req.single_tool_call }))
    }

    /// What the output is held to: calls of the tools (any, or the one chosen), or (`auto`)
    /// those or text that does not start like one; `None` when the choice is text.
    pub fn grammar(&self) -> Option<Grammar> {
        let callable = self.tools.iter().filter(|f| self.choice != ToolChoice::Function || f.name == self.function);
        let calls: Vec<Value> = callable
            .map(|f| {
                let arguments = f.parameters.clone().unwrap_or_else(|| json!({"type": "object"}));
                json!({
                    "type": "object",
                    "properties": {"name": {"const": f.name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut call = json!({"anyOf": calls});
        compact(&mut call);
        let start = match self.choice {
            ToolChoice::None => return None,
            ToolChoice::Auto => "TEXT | calls",
            ToolChoice::Required | ToolChoice::Function => "calls",
        };
        let calls = match self.single || self.choice == ToolChoice::Function {
            true => "call",
            false => r#"call ("\n" call)*"#,
        };
        // Text may be anything that does not open a call.
        let text = match self.choice {
            ToolChoice::Auto => "TEXT: /(.|\\n)*/ & ~/<tool_call>(.|\\n)*/\n",
            _ => "",
        };
        Some(Grammar::Lark(format!(
            "start: {start}\ncalls: {calls}\ncall: \"{OPEN}\\n\" %json {call} \"\\n</tool_call>\"\n{text}"
        )))
    }

    /// The tools as transformers hands them to chat templates: OpenAI's `{"type": "function",
    /// "function": {...}}`, with what the request gave.
    pub fn shown(&self) -> Vec<Value> {
        (self.tools.iter())
            .map(|f| {
                let mut function = json!({"name": f.name});
                if !f.description.is_empty() {
                    function["description"] = json!(f.description);
                }
                if let Some(parameters) = &f.parameters {
                    function["parameters"] = parameters.clone();
                }
                json!({"type": "function", "function": function})
            })
            .collect()
    }

    /// What takes the calls out of the output, unless the choice is text.
    pub fn parser(&self) -> Option<CallParser> {
        (self.choice != ToolChoice::None).then(CallParser::default)
    }
}

/// A function the model may call.
#[derive(Clone, Debug)]
struct Function {
    name: String,
    description: String,
    /// Its arguments' JSON schema; none: any object.
    parameters: Option<Value>,
}

/// A tool's arguments' schema, from `parameters` (JSON text; empty: none given).
fn parameters(tool: &str, parameters: &str) -> Result<Option<Value>> {
    if parameters.is_empty() {
        return Ok(None);
    }
    match serde_json::from_str(parameters) {
        Ok(schema @ Value::Object(_)) => Ok(Some(schema)),
        Ok(_) => Err(invalid(&format!("tool {tool:?}: its parameters must be a JSON schema object"))),
        Err(e) => Err(invalid(&format!("tool {tool:?}: its parameters are not JSON: {e}"))),
    }
}

fn invalid(msg: &str) -> Error {
    Error::InvalidRequest(msg.to_string())
}

/// A call as the model writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Call {
    name: String,
    arguments: Box<RawValue>,
}

/// What is known of the output so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Seen {
    /// Nothing yet, or a beginning that may open a call.
    #[default]
    Undecided,
    /// Text: it does not open a call.
    Text,
    /// Calls.
    Calls,
}

/// Takes the calls out of an output as its text settles.
#[derive(Debug, Default)]
pub struct CallParser {
    seen: Seen,
    /// Text not passed on yet: a beginning that may open a call, or a call not closed yet.
    held: String,
    called: bool,
}

impl CallParser {
    /// `text`, settled since the last push: what of it is the answer's text, and the calls it
    /// closed.
    pub fn push(&mut self, text: &str) -> (String, Vec<ToolCall>) {
        self.held.push_str(text);
        if self.seen == Seen::Undecided {
            if self.held.starts_with(OPEN) {
                self.seen = Seen::Calls;
            } else if !OPEN.starts_with(self.held.as_str()) {
                self.seen = Seen::Text;
            }
        }
        match self.seen {
            Seen::Undecided => (String::new(), Vec::new()),
            Seen::Text => (std::mem::take(&mut self.held), Vec::new()),
            Seen::Calls => {
                let calls = self.closed_calls();
                // Text that breaks the form (only free text can) is text.
                let text = match self.seen {
                    Seen::Text => std::mem::take(&mut self.held),
                    _ => String::new(),
                };
                (text, calls)
            }
        }
    }

    /// The end of the output: what is held and never became a call (an answer cut short) is
    /// text.
    pub fn finish(&mut self, text: &str) -> (String, Vec<ToolCall>) {
        let (mut rest, calls) = self.push(text);
        rest.push_str(&std::mem::take(&mut self.held));
        (rest, calls)
    }

    /// Whether the output called a tool.
    pub fn called(&self) -> bool {
        self.called
    }

    /// The calls held whole, taken out of `held`.
    fn closed_calls(&mut self) -> Vec<ToolCall> {
        let mut calls = Vec::new();
        loop {
            let rest = self.held.trim_start_matches('\n');
            let Some(body) = rest.strip_prefix(OPEN) else {
                if !rest.is_empty() && !OPEN.starts_with(rest) {
                    self.seen = Seen::Text;
                }
                break;
            };
            // `CLOSE` cannot occur inside JSON (its strings escape line breaks; outside them `<`
            // is not JSON), so the first one ends the call, whatever its strings hold.
            let Some(end) = body.find(CLOSE) else {
                break;
            };
            let Ok(call) = serde_json::from_str::<Call>(&body[..end]) else {
                self.seen = Seen::Text;
                break;
            };
            let used = self.held.len() - body.len() + end + CLOSE.len();
            self.held.drain(..used);
            self.called = true;
            // The arguments as the model wrote them (as JSON, an integer may be any size).
            calls.push(ToolCall { id: String::new(), name: call.name, arguments: call.arguments.get().to_string() });
        }
        calls
    }
}
