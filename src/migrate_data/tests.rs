use bytes::BytesMut;

use super::tables::tables;
use super::values::Numeric;
use super::*;

fn numeric(cents: u64) -> Vec<i16> {
    let mut out = BytesMut::new();
    Numeric(cents).encode(&mut out).unwrap();
    out.chunks(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect()
}

#[test]
fn amounts_encode_as_binary_numeric_with_two_fraction_digits() {
    // [ndigits, weight, sign, dscale, digits…]
    assert_eq!(numeric(10_050), [2, 0, 0, 2, 100, 5000], "100.50");
    assert_eq!(numeric(1), [1, -1, 0, 2, 100], "0.01");
    assert_eq!(numeric(1_000_000), [3, 1, 0, 2, 1, 0, 0], "10000.00");
    assert_eq!(numeric(123_456_789), [3, 1, 0, 2, 123, 4567, 8900], "1234567.89");
}

#[test]
fn the_copied_schema_is_the_last_sqlite_migration() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite");
    let last = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.split('_').next()?.parse::<i64>().ok())
        .max();
    assert_eq!(last, Some(SQLITE_SCHEMA_VERSION), "a new SQLite migration: teach migrate-data its columns");
}

#[test]
fn arguments_must_name_a_sqlite_source_and_a_different_postgres_target() {
    let usage = |from: Option<&str>, to: Option<&str>| match parse_args(from, to) {
        Err(MigrateDataError::Usage(message)) => message,
        other => panic!("{from:?} {to:?}: {other:?}"),
    };
    assert!(usage(None, Some("postgres://db/x")).contains("--from"));
    assert!(usage(Some("sqlite://a.db"), None).contains("--to"));
    assert!(usage(Some("sqlite://a.db"), Some("sqlite://a.db")).contains("same"));
    assert!(usage(Some("postgres://db/x"), Some("postgres://db/y")).contains("--from"));
    assert!(usage(Some("sqlite://a.db"), Some("sqlite://b.db")).contains("--to"));
    assert!(usage(Some("mysql://x"), Some("postgres://db/y")).contains("--from"));
    let secret = usage(Some("sqlite://a.db"), Some("mysql://u:hunter2@db/x"));
    assert!(!secret.contains("hunter2"), "{secret}");
    assert_eq!(
        parse_args(Some("sqlite:///var/x.db"), Some("postgres://db/x")),
        Ok((PathBuf::from("/var/x.db"), "postgres://db/x".to_owned()))
    );
}

#[test]
fn every_table_of_both_schemas_is_copied() {
    // PostgreSQL tables of running processes, never copied: the webhook dispatchers
    // registered, like the delivery leases they hold.
    const NOT_COPIED: &[&str] = &["delivery_dispatchers"];
    let names: Vec<&str> = tables().iter().map(|t| t.name).collect();
    for migrations in ["sqlite", "postgres"] {
        let dir = format!("{}/migrations/{migrations}", env!("CARGO_MANIFEST_DIR"));
        for entry in std::fs::read_dir(dir).unwrap() {
            let sql = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for line in sql.lines().filter(|l| l.starts_with("CREATE TABLE ")) {
                let table = line["CREATE TABLE ".len()..].split_whitespace().next().unwrap();
                let copied = names.contains(&table) || NOT_COPIED.contains(&table);
                assert!(copied, "{migrations}: table {table} is not copied");
            }
        }
    }
}
