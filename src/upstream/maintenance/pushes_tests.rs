use super::*;

fn words(s: &str) -> Vec<&[u8]> {
    s.split(' ').map(str::as_bytes).collect()
}

#[test]
fn each_push_is_read() {
    assert_eq!(
        parse(&words("MOVING 7 15 node-2.example.net:10000")),
        Some(Push::Moving {
            seq: 7,
            ttl: Duration::from_secs(15),
            to: Some("node-2.example.net:10000".into()),
        })
    );
    assert_eq!(
        parse(&words("MOVING 8 20 null")),
        Some(Push::Moving {
            seq: 8,
            ttl: Duration::from_secs(20),
            to: None,
        })
    );
    assert_eq!(
        parse(&words("MIGRATING 9 5 shard-1")),
        Some(Push::Migrating {
            seq: 9,
            ttl: Duration::from_secs(5)
        })
    );
    assert_eq!(
        parse(&words("MIGRATED 10 shard-1")),
        Some(Push::Migrated { seq: 10 })
    );
    assert_eq!(
        parse(&words("failing_over 11 3")),
        Some(Push::FailingOver {
            seq: 11,
            ttl: Duration::from_secs(3)
        })
    );
    assert_eq!(
        parse(&words("FAILED_OVER 12")),
        Some(Push::FailedOver { seq: 12 })
    );
    assert_eq!(
        parse(&words("SMIGRATING 13 0-100")),
        Some(Push::SMigrating { seq: 13 })
    );
    assert_eq!(
        parse(&words("SMIGRATED 14 x")),
        Some(Push::SMigrated { seq: 14 })
    );
    // No ttl: the default.
    assert_eq!(
        parse(&words("FAILING_OVER 15")),
        Some(Push::FailingOver {
            seq: 15,
            ttl: DEFAULT_TTL
        })
    );
}

#[test]
fn other_pushes_and_bad_ones_are_not_maintenance() {
    for s in [
        "message chan hello",
        "invalidate key",
        "MOVING",
        "MOVING x 15 h:1",
        "MOVING -1 15 h:1",
        "",
    ] {
        assert_eq!(parse(&words(s)), None, "{s}");
    }
    assert_eq!(parse(&[]), None);
    assert_eq!(parse(&[b"MOVING", b"\xff"]), None);
}

#[test]
fn a_repeat_is_dropped_and_a_new_sequence_is_not() {
    let mut d = Dedup::default();
    let p = parse(&words("MOVING 7 15 null")).unwrap();
    assert!(d.first(&p));
    // The same notice again (after a reconnect, say): dropped.
    assert!(!d.first(&p));
    // Another kind with the same number is another notice.
    assert!(d.first(&parse(&words("MIGRATING 7 5")).unwrap()));
    assert!(d.first(&parse(&words("MOVING 8 15 null")).unwrap()));
    // Only the last few are remembered: the set stays small.
    for seq in 100..300 {
        assert!(d.first(&Push::Migrated { seq }));
    }
    assert!(d.seen.len() <= 64);
}

#[test]
fn each_push_has_its_action() {
    let a = |s: &str| decide(&parse(&words(s)).unwrap());
    assert_eq!(
        a("MOVING 1 15 h:1"),
        Action::HandOver {
            to: Some("h:1".into()),
            within: Duration::from_secs(15)
        }
    );
    assert_eq!(
        a("MIGRATING 2 5"),
        Action::Relax {
            ttl: Duration::from_secs(5)
        }
    );
    assert_eq!(
        a("FAILING_OVER 3 9"),
        Action::Relax {
            ttl: Duration::from_secs(9)
        }
    );
    assert_eq!(a("MIGRATED 4"), Action::Restore);
    assert_eq!(a("FAILED_OVER 5"), Action::Restore);
    assert_eq!(a("SMIGRATING 6 1-2"), Action::RefreshSlots);
    assert_eq!(a("SMIGRATED 7"), Action::RefreshSlots);
}
