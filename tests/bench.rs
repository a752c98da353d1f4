//! `kvcoord-harness bench --quick` runs every scenario end to end and prints each
//! beside its baseline and ratio. This asserts what is printed, never how
//! fast: speed is the benchmark's business, not a test's.

#[test]
fn bench_quick_prints_every_scenario_beside_its_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcoord-harness"))
        .args(["bench", "--quick", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for scenario in [
        "ping, one at a time",
        "lookup 64 chunks, one at a time",
        "lookup 64 chunks, 256 in flight, 1 client",
        "lookup 64 chunks, 8 client processes",
        "host store, 1 TP client",
        "host retrieve, 1 TP client",
        "host store, 4 TP clients",
        "host retrieve, 4 TP clients",
        "recovery: listening -> all 8 clients registered again",
        "recovery: listening -> first successful store",
        "index: resident memory per entry",
        "index: lookup 1-chunk prefix",
        "index: lookup 64-chunk prefix",
        "index: lookup 4096-chunk prefix",
        "disk tier: lookup hit rate after restart",
        "disk tier: retrieve after restart",
        "remote tier: store 64 x 8 MiB chunks",
        "remote tier: retrieve 64 x 8 MiB chunks, L1 miss",
        "remote tier: lookup 64-chunk prefix, L1 miss p50",
        "remote tier: lookup 64-chunk prefix, L1 miss p99",
    ] {
        let line =
            stdout.lines().find(|l| l.starts_with(scenario)).unwrap_or_else(|| panic!("no `{scenario}` in\n{stdout}"));
        let numbers = line.split_whitespace().filter(|w| w.parse::<f64>().is_ok_and(f64::is_finite)).count();
        assert!(numbers >= 3, "`{line}` must show kvcoord, baseline and ratio");
    }
    let rows = std::fs::read_to_string(&json).unwrap();
    assert!(rows.starts_with('[') && rows.matches("\"scenario\"").count() >= 24, "{rows}");
}
