//! Log lines that say which rank and host wrote them.
//!
//! Every line reads `2026-11-28T15:36:30.123456Z  INFO [rank 1/4 algo-2] message`, so interleaved logs of many workers
//! (kubectl logs, CloudWatch) stay readable. The rank is set once the plan is known; until then lines say `[rank ?]`.

use std::fmt;
use std::io::IsTerminal;
use std::sync::RwLock;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

static WHO: RwLock<String> = RwLock::new(String::new());

/// Installs the global subscriber writing to stderr. `level` is used when `RUST_LOG` is not set.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .event_format(RankFormat)
        .try_init();
}

/// Tags every following log line with this process's rank, world size and host.
pub fn set_rank(rank: usize, world_size: usize, host: &str) {
    set_who(format!("rank {rank}/{world_size} {host}"));
}

/// Tags every following log line of a launcher process with the node it runs on.
pub fn set_node(node_rank: usize, nnodes: usize, host: &str) {
    set_who(format!("launch node {node_rank}/{nnodes} {host}"));
}

/// Tags every following log line of a standalone rendezvous store with the host it runs on.
pub fn set_store(host: &str) {
    set_who(format!("rendezvous store {host}"));
}

fn set_who(who: String) {
    // A poisoned lock held a whole String: the tag is still whole.
    *WHO.write().unwrap_or_else(|p| p.into_inner()) = who;
}

struct RankFormat;

impl<S, N> FormatEvent<S, N> for RankFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        SystemTime.format_time(&mut writer)?;
        let who = WHO.read().unwrap_or_else(|p| p.into_inner());
        let who = if who.is_empty() { "rank ?" } else { who.as_str() };
        write!(writer, " {:>5} [{who}] ", event.metadata().level())?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                match ext.get::<FormattedFields<N>>() {
                    Some(fields) if !fields.is_empty() => write!(writer, "{}{{{fields}}}: ", span.name())?,
                    _ => write!(writer, "{}: ", span.name())?,
                }
            }
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
