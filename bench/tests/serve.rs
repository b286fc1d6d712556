//! `hilrig bench serve` on a small store (moved from serve/tests/serve.rs).

#[test]
fn the_bench_runs_on_a_small_store() {
    let o = hilrig_bench::serve::BenchOptions {
        nights: 6,
        cases: 12,
        page_requests: 2,
        rate: 40.0,
        load_time: std::time::Duration::from_millis(250),
    };
    let f = hilrig_bench::serve::bench_serve(&o, None).unwrap();
    let failed = f.iter().find(|x| x.name.contains("failed")).unwrap();
    assert_eq!(failed.value, 0.0, "no failed API requests");
    assert!(f.iter().any(|x| x.name.contains("runs index")));
    assert!(f[1].baseline == Some(0));
}
