//! Structured outputs: a request's output held to a [`Grammar`] (a JSON schema, or the calls
//! of its tools) by a mask over the vocabulary at every step, from llguidance (the parser
//! behind guidance, used by vLLM and SGLang).
//!
//! - [`Grammars`]: what compiles grammars for one model's tokenizer, made once per engine.
//! - [`Constraint`]: one request's parser; it masks a row of logits and follows the tokens
//!   sampled, so requests of many grammars (and none) share a batch.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

/// What a request's output is held to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Grammar {
    /// JSON that this schema holds.
    JsonSchema(Value),
    /// llguidance's Lark syntax, JSON schemas inline as `%json` ([`crate::tools`]).
    Lark(String),
}

/// Has JSON that `schema` holds written compactly: no whitespace between tokens, so that a
/// model cannot spin in it.
pub fn compact(schema: &mut Value) {
    if let Value::Object(o) = schema {
        o.insert("x-guidance".into(), json!({"whitespace_flexible": false, "item_separator": ", "}));
    }
}

/// Compiles grammars into per-request constraints for one tokenizer.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// For `tokenizer`'s tokens over a vocabulary of `vocab_size` (the model's: ids past the
    /// tokenizer's never match), ending with `eos`.
    pub fn new(tokenizer: &TextTokenizer, vocab_size: usize, eos: u32) -> Result<Self> {
        let text = tokenizer.inner().to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut tokens = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|e| Error::Tokenizer(format!("the tokens' bytes: {e}")))?;
        tokens.resize(vocab_size.max(tokens.len()), Vec::new());
        let info = TokRxInfo::new(tokens.len() as u32, eos);
        let env = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &tokens)));
        let mut factory = ParserFactory::new_simple(&(env as _)).map_err(|e| Error::Internal(e.to_string()))?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// A constraint to `grammar`, its JSON written [`compact`]ly. A grammar llguidance cannot
    /// compile is the request's error.
    pub fn constraint(&self, grammar: &Grammar) -> Result<Constraint> {
        let (top, what) = match grammar {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                compact(&mut schema);
                (TopLevelGrammar::from_json_schema(schema), "the JSON schema")
            }
            Grammar::Lark(lark) => (TopLevelGrammar::from_lark(lark.clone()), "the tools' schemas"),
        };
        let matcher = Matcher::new(self.factory.create_parser(top));
        match matcher.get_error() {
            Some(e) => Err(Error::InvalidRequest(format!("{what}: {e}"))),
            None => Ok(Constraint { matcher }),
        }
    }
}

/// One request's parser.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Sets the logits of the tokens the schema does not allow next to -inf. A parser that
    /// failed allows only the end of the sequence (`eos`).
    pub fn mask(&mut self, logits: &mut [f32], eos: u32) {
        match self.matcher.compute_mask() {
            Ok(allowed) => {
                for (id, l) in logits.iter_mut().enumerate() {
                    if !allowed.is_allowed(id as u32) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            Err(e) => {
                tracing::warn!("structured output: {e}");
                for (id, l) in logits.iter_mut().enumerate() {
                    if id as u32 != eos {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }

    /// Follows the token sampled.
    pub fn advance(&mut self, token: u32) {
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::warn!("structured output: {e}");
        }
    }
}
