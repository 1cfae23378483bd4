use super::*;

fn at(s: &str) -> SystemTime {
    humantime::parse_rfc3339_weak(s).unwrap()
}

fn msg(kind: &str, start: &str, replica: bool) -> Vec<u8> {
    format!("NotificationType|{kind}|StartTimeInUTC|{start}|IsReplica|{replica}|IPAddress|10.0.0.4|SSLPort|15001|NonSSLPort|13001").into_bytes()
}

#[test]
fn azure_notices_are_read_field_by_field() {
    let n = parse(&msg("NodeMaintenanceStart", "2026-12-07T05:26:11", false)).unwrap();
    assert_eq!(n.kind, Kind::Start);
    assert_eq!(n.start, Some(at("2026-12-07T05:26:11")));
    assert!(!n.is_replica);
    assert_eq!(n.ip.as_deref(), Some("10.0.0.4"));
    assert_eq!(n.ssl_port, Some(15001));
    let n = parse(&msg(
        "NodeMaintenanceEnded",
        "2026-12-07T05:26:11.1234567Z",
        true,
    ))
    .unwrap();
    assert_eq!(n.kind, Kind::Ended);
    assert!(n.is_replica);
    assert!(n.start.is_some());
    // Azure writes the boolean as True / False.
    let n = parse(&msg("NodeMaintenanceStarting", "x", false).replace_false()).unwrap();
    assert!(n.is_replica);
    assert_eq!(n.start, None);
    for k in [
        "NodeMaintenanceScheduled",
        "NodeMaintenanceFailoverComplete",
        "NodeMaintenanceScaleComplete",
    ] {
        let n = parse(&msg(k, "2026-12-07T05:26:11", false)).unwrap();
        assert_eq!(n.kind.label(), k);
    }
    assert_eq!(
        parse(b"NotificationType|SomethingNew").unwrap().kind,
        Kind::Other("SomethingNew".into())
    );
}

trait ReplaceFalse {
    fn replace_false(self) -> Vec<u8>;
}

impl ReplaceFalse for Vec<u8> {
    fn replace_false(self) -> Vec<u8> {
        String::from_utf8(self)
            .unwrap()
            .replace("IsReplica|false", "IsReplica|True")
            .into_bytes()
    }
}

#[test]
fn what_is_not_a_notice_is_none_and_never_a_panic() {
    assert_eq!(parse(b""), None);
    assert_eq!(parse(b"hello"), None);
    assert_eq!(parse(b"\xff\xfe|NotificationType"), None);
    assert_eq!(parse(b"NotificationType"), None);
    let full = msg("NodeMaintenanceStart", "2026-12-07T05:26:11", false);
    for n in 0..full.len() {
        let _ = parse(&full[..n]);
    }
}

#[test]
fn start_drains_from_a_second_before_until_three_after() {
    let now = at("2026-12-07T05:00:00");
    let mut n = parse(&msg("NodeMaintenanceStart", "2026-12-07T05:00:04", false)).unwrap();
    assert_eq!(
        decide(&n, now),
        Action::Drain {
            from: at("2026-12-07T05:00:03"),
            until: at("2026-12-07T05:00:07"),
        }
    );
    // Announced for a moment already past (or a second truncated away): at once.
    n.start = Some(at("2026-12-07T04:59:59"));
    assert_eq!(
        decide(&n, now),
        Action::Drain {
            from: now,
            until: at("2026-12-07T05:00:03"),
        }
    );
    // No readable time: Azure's "under 5 s ahead".
    n.start = None;
    assert_eq!(
        decide(&n, now),
        Action::Drain {
            from: now,
            until: at("2026-12-07T05:00:08"),
        }
    );
    // Far ahead (a wrong clock): not acted on.
    n.start = Some(at("2026-12-07T05:05:00"));
    assert_eq!(decide(&n, now), Action::Note);
}

#[test]
fn each_notice_has_its_action() {
    let now = at("2026-12-07T05:00:00");
    let d = |k: &str, replica: bool| {
        decide(
            &parse(&msg(k, "2026-12-07T05:00:01", replica)).unwrap(),
            now,
        )
    };
    assert_eq!(d("NodeMaintenanceScheduled", false), Action::Note);
    assert_eq!(d("NodeMaintenanceStarting", false), Action::Note);
    assert_eq!(d("NodeMaintenanceFailoverComplete", false), Action::Refresh);
    assert_eq!(d("NodeMaintenanceScaleComplete", false), Action::Refresh);
    assert_eq!(d("NodeMaintenanceEnded", false), Action::Resume);
    // A replica's maintenance does not touch the primary's connections.
    assert_eq!(d("NodeMaintenanceStart", true), Action::Note);
    assert_eq!(d("NodeMaintenanceFailoverComplete", true), Action::Note);
    assert!(matches!(
        d("NodeMaintenanceStart", false),
        Action::Drain { .. }
    ));
}
