//! Attacks by a local user on the report files (issue 16). Each test names its
//! attack in its first comment.

use hilrig_reports::{sample_run, write_reports};

#[test]
fn reports_do_not_follow_symlinks_planted_at_the_old_temporary_names() {
    // Attack: symlinks at `.<name>.tmp.<pid>` in the report directory point at a
    // file the (root) runner would overwrite with report bytes.
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let pid = std::process::id();
    for name in ["junit.xml", "report.json", "report.html"] {
        std::os::unix::fs::symlink(&victim, d.path().join(format!(".{name}.tmp.{pid}"))).unwrap();
    }
    let paths = write_reports(&sample_run(3), None, d.path()).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::read_to_string(&paths.junit)
        .unwrap()
        .contains("<testsuite"));
    // Nothing but the reports, the victim and the planted links is left behind.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 3 + 1 + 3);
}
