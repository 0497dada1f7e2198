//! Configuration of the processes a service manager runs (`tandem coordinator`, `tandem
//! worker`). Every flag of theirs is also a key of a TOML file (`--config FILE`; the key is the
//! flag's long name: `pool-pages = 4096`) and an environment variable (`TANDEM_POOL_PAGES`). A
//! flag wins over the variable, the variable over the file, the file over the default. The keys
//! are the flags themselves, parsed and checked by clap, so the three ways never disagree.
//!
//! `tandem config check FILE` parses a file the same way and prints the settings in effect.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches, Subcommand};

/// The commands that run as long-lived processes, and so take a config file and variables.
const PROCESSES: [&str; 2] = ["coordinator", "worker"];

/// The flag every process takes: where its config file is.
#[derive(Args, Clone, Debug, Default)]
pub struct ConfigFile {
    /// A TOML file of settings: each key a long flag's name (`pool-pages = 4096`); flags and
    /// TANDEM_* variables win over it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

#[derive(Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    action: ConfigAction,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Check a process's config file (with the TANDEM_* variables set here) and print the
    /// settings in effect, each with where it came from.
    Check {
        file: PathBuf,
        /// coordinator | worker (default: the one whose flags the file's keys are).
        #[arg(long)]
        process: Option<String>,
        /// Check as on the host of this name (default: this one): a coordinator's id and a
        /// worker's may come from it.
        #[arg(long)]
        host: Option<String>,
        /// The process's flags, as its command line gives them beside the file.
        #[arg(last = true)]
        flags: Vec<String>,
    },
}

/// This machine's host name (a Kubernetes pod's name): what a process is called when its
/// settings do not name it, so one config file serves every host.
pub fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    Ok(name.trim().to_string())
}

/// The environment variable of a flag: `--pool-pages` is `TANDEM_POOL_PAGES`.
fn env_name(long: &str) -> String {
    format!("TANDEM_{}", long.to_uppercase().replace('-', "_"))
}

/// `cli` with a variable on every flag of the processes (and on `tandem`'s global flags).
pub fn with_env(cli: Command) -> Command {
    let with_variable = |a: Arg| match a.get_long().filter(|_| takes_setting(&a)).map(env_name) {
        Some(name) => a.env(name),
        None => a,
    };
    let mut cli = cli.mut_args(|a| if a.is_global_set() { with_variable(a) } else { a });
    for process in PROCESSES {
        cli = cli.mut_subcommand(process, |c| c.mut_args(with_variable));
    }
    cli
}

/// Whether `arg` is a setting (not help or version).
fn takes_setting(arg: &Arg) -> bool {
    !matches!(arg.get_action(), ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version)
}

/// The command line `argv` with the settings of the config file it names (if any) added: each
/// key of the file not already given as a flag or a variable, as its flag.
pub fn expand(cli: &Command, argv: Vec<OsString>) -> Result<Expanded> {
    let first = cli.clone().ignore_errors(true).try_get_matches_from(&argv);
    let Ok(first) = first else { return Ok(Expanded { argv, file: None }) };
    let Some((process, given)) = first.subcommand().filter(|(name, _)| PROCESSES.contains(name)) else {
        return Ok(Expanded { argv, file: None });
    };
    let Some(path) = given.get_one::<PathBuf>("config").cloned() else { return Ok(Expanded { argv, file: None }) };
    let command = cli.find_subcommand(process).ok_or_else(|| anyhow!("no command {process}"))?;
    let mut expanded = Expanded { argv, file: None };
    let mut keys = Vec::new();
    for (key, value) in read(&path)? {
        let arg = find_arg(cli, command, &key)
            .ok_or_else(|| anyhow!("{}: unknown key `{key}`: `tandem {process}` has no --{key}", path.display()))?;
        let from_user = matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !from_user {
            let flags = flags(arg, &key, &value).with_context(|| format!("{}: key `{key}`", path.display()))?;
            expanded.argv.extend(flags.into_iter().map(OsString::from));
            keys.push(key);
        }
    }
    expanded.file = Some((path, keys));
    Ok(expanded)
}

/// A command line with a config file's settings added.
pub struct Expanded {
    argv: Vec<OsString>,
    /// The file, and the keys it gave (those no flag or variable overrode).
    file: Option<(PathBuf, Vec<String>)>,
}

impl Expanded {
    /// Parses the command line; an invalid value that came from the file is reported with its
    /// key and file, one that came from a variable with its variable.
    pub fn parse(&self, cli: Command) -> std::result::Result<ArgMatches, clap::Error> {
        cli.try_get_matches_from(&self.argv).map_err(|e| {
            let Some(ContextValue::String(flag)) = e.get(ContextKind::InvalidArg) else { return e };
            let long = flag.trim_start_matches('-').split([' ', '=']).next().unwrap_or_default();
            let what = e.to_string();
            let what = what.trim_start_matches("error: ");
            match &self.file {
                Some((path, keys)) if keys.iter().any(|k| k == long) => {
                    clap::Error::raw(e.kind(), format!("{}: key `{long}`: {what}", path.display()))
                }
                _ if std::env::var_os(env_name(long)).is_some() => {
                    clap::Error::raw(e.kind(), format!("{} (from {}): {what}", flag, env_name(long)))
                }
                _ => e,
            }
        })
    }
}

impl Expanded {
    /// Whether the file gave setting `key` (no flag or variable did).
    fn gave(&self, key: &str) -> bool {
        self.file.as_ref().is_some_and(|(_, keys)| keys.iter().any(|k| k == key))
    }
}

/// The file's keys and values, in the order they are written.
fn read(path: &Path) -> Result<Vec<(String, toml::Value)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("config file {}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(table.into_iter().collect())
}

/// The flag a key stands for: one of the process's own, or a global one of `tandem`'s.
fn find_arg<'a>(cli: &'a Command, command: &'a Command, key: &str) -> Option<&'a Arg> {
    let is = |a: &&Arg| a.get_long() == Some(key) && takes_setting(a) && key != "config";
    (command.get_arguments().find(is)).or_else(|| cli.get_arguments().filter(|a| a.is_global_set()).find(is))
}

/// `value` as the flags that set `arg`.
fn flags(arg: &Arg, key: &str, value: &toml::Value) -> Result<Vec<String>> {
    let scalar = |v: &toml::Value| match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(x) => Ok(x.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(anyhow!("a {} is not a value of --{key}", other.type_str())),
    };
    Ok(match (arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(on)) => on.then(|| format!("--{key}")).into_iter().collect(),
        (ArgAction::SetTrue, _) => bail!("--{key} is a switch: true or false"),
        (ArgAction::Append, toml::Value::Array(items)) => {
            items.iter().map(|v| Ok(format!("--{key}={}", scalar(v)?))).collect::<Result<_>>()?
        }
        (_, toml::Value::Array(_)) => bail!("--{key} takes one value, not a list"),
        (_, v) => vec![format!("--{key}={}", scalar(v)?)],
    })
}

/// `tandem config check`.
pub fn config(args: ConfigArgs, cli: Command) -> Result<()> {
    let ConfigAction::Check { file, process, host, flags } = args.action;
    let host = match host {
        Some(host) => host,
        None => hostname()?,
    };
    let process = match process {
        Some(p) if PROCESSES.contains(&p.as_str()) => p,
        Some(p) => bail!("--process {p:?}: expected one of {}", PROCESSES.join(", ")),
        None => infer_process(&cli, &file)?,
    };
    let argv: Vec<OsString> = (["tandem", &process].into_iter().map(OsString::from))
        .chain(flags.into_iter().map(OsString::from))
        .chain([OsString::from("--config"), file.into()])
        .collect();
    let expanded = expand(&cli, argv)?;
    let matches = (expanded.parse(cli.clone()))
        .map_err(|e| anyhow!("{}", e.to_string().trim_start_matches("error: ").trim_end()))?;
    let (_, given) = matches.subcommand().ok_or_else(|| anyhow!("no process parsed"))?;
    let command = cli.find_subcommand(&process).ok_or_else(|| anyhow!("no command {process}"))?;
    let id = match process.as_str() {
        "coordinator" => crate::coordinator::CoordinatorArgs::from_arg_matches(given)?.check(&host)?.to_string(),
        _ => crate::worker::WorkerArgs::from_arg_matches(given)?.check(&host)?,
    };
    println!("# tandem {process}: the settings in effect; on host {host} it runs as {process} {id}");
    for arg in command.get_arguments().filter(|a| takes_setting(a) && a.get_long().is_some_and(|l| l != "config")) {
        let long = arg.get_long().unwrap_or_default();
        let id = arg.get_id().as_str();
        let raw: Vec<String> =
            given.get_raw(id).into_iter().flatten().map(|v| v.to_string_lossy().into_owned()).collect();
        let source = match given.value_source(id) {
            Some(ValueSource::CommandLine) if expanded.gave(long) => "file".to_string(),
            Some(ValueSource::CommandLine) => "flag".to_string(),
            Some(ValueSource::EnvVariable) => env_name(long),
            Some(ValueSource::DefaultValue) => "default".to_string(),
            _ => String::new(),
        };
        match raw.as_slice() {
            [] => println!("# {long}: unset"),
            [one] if !matches!(arg.get_action(), ArgAction::Append) => {
                println!("{long} = {}  # {source}", toml_value(one))
            }
            many => {
                println!("{long} = [{}]  # {source}", many.iter().map(|v| toml_value(v)).collect::<Vec<_>>().join(", "))
            }
        }
    }
    Ok(())
}

/// A setting as TOML: numbers and switches bare, anything else a string.
fn toml_value(raw: &str) -> String {
    if raw.parse::<i64>().is_ok() || raw.parse::<f64>().is_ok_and(f64::is_finite) || raw == "true" || raw == "false" {
        raw.to_string()
    } else {
        toml::Value::String(raw.to_string()).to_string()
    }
}

/// The process whose flags every key of `file` is.
fn infer_process(cli: &Command, file: &Path) -> Result<String> {
    let keys: Vec<String> = read(file)?.into_iter().map(|(k, _)| k).collect();
    let fits: Vec<&str> = (PROCESSES.iter().copied())
        .filter(|p| cli.find_subcommand(p).is_some_and(|c| keys.iter().all(|k| find_arg(cli, c, k).is_some())))
        .collect();
    match fits.as_slice() {
        [one] => Ok(one.to_string()),
        [] => bail!("{}: its keys are not all flags of one process; name it with --process", file.display()),
        _ => bail!("{}: its keys fit {}; name the process with --process", file.display(), fits.join(" and ")),
    }
}
