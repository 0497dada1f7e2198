//! The rules every identifier and path in the replicated state follows. They are checked
//! where a value enters (gateway, CLI) for a clear message, and again by the state machine
//! before a command applies, so no command can put a bad value into replicated state.

use super::Invalid;

/// Tenants are the operator's identifiers: 1 to 64 letters, digits, `-`, `_` or `.` (so that
/// `tenant:adapter` names one adapter of one tenant).
pub fn check_tenant(tenant: &str) -> Result<(), Invalid> {
    let ok = (1..=64).contains(&tenant.len())
        && tenant != "."
        && !tenant.contains("..")
        && tenant.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    match ok {
        true => Ok(()),
        false => Err(Invalid(format!("tenant {tenant:?}: use 1 to 64 letters, digits, `-`, `_` or `.`"))),
    }
}

/// Checks a name (an id, an adapter, a suffix): it may end up in a path or a metric label, so
/// no path separators, no `..`, no control characters, not empty, not long.
pub fn check_name(what: &str, name: &str) -> Result<(), Invalid> {
    let bad = if name.is_empty() || name.len() > 128 {
        Some("must be 1 to 128 bytes")
    } else if name.contains(['/', '\\']) || name.contains("..") {
        Some("must not contain `/`, `\\` or `..`")
    } else if name.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    verdict(what, name, bad)
}

/// Checks where something is stored (a path or URI that workers open): not empty, no `..`
/// component, no control characters.
pub fn check_uri(what: &str, uri: &str) -> Result<(), Invalid> {
    let bad = if uri.is_empty() || uri.len() > 4096 {
        Some("must be 1 to 4096 bytes")
    } else if uri.split(['/', '\\']).any(|part| part == "..") {
        Some("must not contain a `..` component")
    } else if uri.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    };
    verdict(what, uri, bad)
}

/// OpenAI's rule for the names of functions (tools) and response schemas: 1 to 64 letters,
/// digits, `_` or `-` (a tool call names its function in JSON the model writes).
pub fn check_function_name(what: &str, name: &str) -> Result<(), Invalid> {
    let ok = (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c));
    verdict(what, name, (!ok).then_some("use 1 to 64 letters, digits, `_` or `-`"))
}

/// `value` (a `what`) breaks the rule `bad` names, if it names one.
fn verdict(what: &str, value: &str, bad: Option<&str>) -> Result<(), Invalid> {
    match bad {
        Some(why) => Err(Invalid(format!("{what} {value:?}: {why}"))),
        None => Ok(()),
    }
}

/// Checks a network address (`HOST:PORT`); `optional` allows it empty.
/// The roles a chat message may have (OpenAI's).
pub const CHAT_ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// A chat message's role: one of [`CHAT_ROLES`] (the chat template writes it into the prompt).
pub fn check_role(role: &str) -> Result<(), Invalid> {
    match CHAT_ROLES.contains(&role) {
        true => Ok(()),
        false => Err(Invalid(format!("role {role:?}: use one of {}", CHAT_ROLES.join(", ")))),
    }
}

pub fn check_addr(what: &str, addr: &str, optional: bool) -> Result<(), Invalid> {
    if addr.is_empty() && optional {
        return Ok(());
    }
    let ok = addr.len() <= 256
        && addr.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        && !addr.chars().any(|c| c.is_whitespace() || c.is_control() || c == '/');
    match ok {
        true => Ok(()),
        false => Err(Invalid(format!("{what} {addr:?} is not HOST:PORT"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_paths_and_addresses_are_checked() {
        assert!(check_tenant("acme-1.x").is_ok());
        assert!(check_tenant("a/b").is_err() && check_tenant("..").is_err() && check_tenant("").is_err());
        assert!(check_name("job", "ftjob-1").is_ok());
        assert!(check_name("job", "../etc").is_err() && check_name("job", "a\nb").is_err());
        assert!(check_uri("uri", "/data/blobs/files/f-1").is_ok());
        assert!(check_uri("uri", "/data/../etc/passwd").is_err() && check_uri("uri", "").is_err());
        assert!(check_addr("addr", "127.0.0.1:7000", false).is_ok() && check_addr("addr", "", true).is_ok());
        assert!(check_addr("addr", "", false).is_err() && check_addr("addr", "host", false).is_err());
        assert!(check_addr("addr", "[::1]:80", false).is_ok() && check_addr("addr", "a b:1", false).is_err());
    }
}
