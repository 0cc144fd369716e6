//! The report: a Markdown table for `docs/BENCHMARKS.md`, then memory and database size.

use crate::load::Stats;
use crate::Args;

/// One table row: rate, latency percentiles, errors, the share of `ceiling`'s rate, and the
/// server CPU time per request.
pub(crate) fn row(stats: &Stats, ceiling: Option<&Stats>) -> String {
    let ratio = ceiling.map_or("—".to_owned(), |c| format!("{:.0} %", 100.0 * stats.rate() / c.rate()));
    let cpu = match stats.server_cpu {
        Some(cpu) if stats.requests > 0 => format!("{:.1}", cpu.as_secs_f64() * 1e6 / stats.requests as f64),
        _ => "—".to_owned(),
    };
    format!(
        "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {cpu} |",
        stats.name,
        stats.rate(),
        stats.percentile_ms(0.5),
        stats.percentile_ms(0.99),
        stats.percentile_ms(0.999),
        stats.errors,
        ratio
    )
}

/// Prints the table of `rows`, then the servers' peak memory and the database's size for
/// `sessions` sessions (`database` bytes, `wal` of them the SQLite WAL's).
pub(crate) fn print(args: &Args, rows: Vec<String>, peak_rss_mib: f64, sessions: usize, (database, wal): (u64, u64)) {
    println!(
        "connections: {}, duration per scenario: {:?}, prefilled sessions: {}",
        args.connections, args.duration, args.prefill
    );
    println!();
    println!("| scenario | requests/s | p50 ms | p99 ms | p99.9 ms | errors | vs ceiling | server CPU µs/request |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        println!("{row}");
    }
    println!();
    println!("server peak RSS: {peak_rss_mib:.1} MiB");
    if sessions > 0 {
        let per_session = |bytes: u64| bytes as f64 / sessions as f64;
        let wal = if wal > 0 {
            format!(" ({wal} of them the WAL; {:.0} bytes per session without it)", per_session(database - wal))
        } else {
            String::new()
        };
        println!(
            "database: {database} bytes for {sessions} sessions = {:.0} bytes per session{wal}",
            per_session(database)
        );
    }
}
