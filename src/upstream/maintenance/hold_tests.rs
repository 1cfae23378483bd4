use super::*;

fn q(hold_ms: u64, count: usize, bytes: usize) -> HoldQueue<u32> {
    HoldQueue::new(Duration::from_millis(hold_ms), count, bytes)
}

#[test]
fn held_commands_come_out_in_order_with_their_waits() {
    let t0 = Instant::now();
    let mut h = q(1000, 10, 1000);
    for i in 0..3 {
        h.push(t0 + Duration::from_millis(10 * i as u64), 5, i)
            .unwrap();
    }
    assert_eq!((h.len(), h.bytes()), (3, 15));
    let out = h.drain(t0 + Duration::from_millis(100));
    let items: Vec<u32> = out.iter().map(|(_, i)| *i).collect();
    assert_eq!(items, [0, 1, 2]);
    assert_eq!(out[0].0, Duration::from_millis(100));
    assert_eq!(out[2].0, Duration::from_millis(80));
    assert!(h.is_empty());
    assert_eq!(h.bytes(), 0);
}

#[test]
fn the_count_bound_refuses_the_newest() {
    let t0 = Instant::now();
    let mut h = q(1000, 2, 1000);
    h.push(t0, 1, 1).unwrap();
    h.push(t0, 1, 2).unwrap();
    assert_eq!(h.push(t0, 1, 3), Err(3));
    assert_eq!(h.len(), 2);
}

#[test]
fn the_byte_bound_refuses_the_newest_but_never_a_lone_command() {
    let t0 = Instant::now();
    let mut h = q(1000, 10, 100);
    // Larger than the bound, but alone: taken.
    h.push(t0, 500, 1).unwrap();
    assert_eq!(h.push(t0, 1, 2), Err(2));
    let _ = h.drain(t0);
    h.push(t0, 60, 3).unwrap();
    h.push(t0, 40, 4).unwrap();
    assert_eq!(h.push(t0, 1, 5), Err(5));
    assert_eq!(h.bytes(), 100);
}

#[test]
fn commands_expire_after_the_hold_oldest_first() {
    let t0 = Instant::now();
    let mut h = q(1000, 10, 1000);
    h.push(t0, 10, 1).unwrap();
    h.push(t0 + Duration::from_millis(500), 10, 2).unwrap();
    assert_eq!(h.next_deadline(), Some(t0 + Duration::from_millis(1000)));
    assert!(h.expire(t0 + Duration::from_millis(999)).is_empty());
    assert_eq!(h.expire(t0 + Duration::from_millis(1000)), [1]);
    assert_eq!(h.bytes(), 10);
    assert_eq!(h.next_deadline(), Some(t0 + Duration::from_millis(1500)));
    assert_eq!(h.expire(t0 + Duration::from_secs(9)), [2]);
    assert_eq!(h.next_deadline(), None);
    assert_eq!(h.bytes(), 0);
}

#[test]
fn only_failures_a_wait_can_cure_are_held_through() {
    let addr = || "h:1".to_string();
    let r = || "x".to_string();
    assert!(hold_through(&UpstreamError::Connect {
        addr: addr(),
        reason: r()
    }));
    assert!(hold_through(&UpstreamError::Tls {
        addr: addr(),
        reason: r()
    }));
    assert!(hold_through(&UpstreamError::Lost { reason: r() }));
    assert!(hold_through(&UpstreamError::Timeout {
        addr: addr(),
        secs: 1.0,
        during: "x"
    }));
    assert!(!hold_through(&UpstreamError::Auth {
        addr: addr(),
        reason: r()
    }));
    assert!(!hold_through(&UpstreamError::NoCredential {
        addr: addr(),
        reason: r()
    }));
    assert!(!hold_through(&UpstreamError::Protocol(r())));
    assert!(!hold_through(&UpstreamError::Shutdown));
}

#[test]
fn the_errors_say_the_command_was_not_sent_and_why() {
    let last = UpstreamError::Connect {
        addr: "h:1".into(),
        reason: "Connection refused".into(),
    };
    let e = expired_error("h:1", Duration::from_secs(15), Some(&last)).to_string();
    assert!(e.contains("15.0s (upstream.hold)"), "{e}");
    assert!(e.contains("not sent"), "{e}");
    assert!(e.contains("Connection refused"), "{e}");
    assert!(!e.contains("may or may not"), "{e}");
    let e = full_error("h:1", None).to_string();
    assert!(e.contains("50000 commands or 32 MiB"), "{e}");
}

#[test]
fn a_held_command_costs_about_a_hundred_bytes_besides_its_own() {
    // What bench/FAILOVER.md counts for the hold's memory at its bounds:
    // one queue entry (the request, when it began waiting, its size), in a
    // VecDeque that may be up to twice as long as what it holds.
    let entry = std::mem::size_of::<(Instant, usize, crate::upstream::conn::Request)>();
    println!("hold queue entry: {entry} bytes");
    assert!(entry <= 128, "{entry}");
}
