use super::*;
use tracing::callsite::Callsite;

/// A call site that only serves as a key (never asked for its metadata).
struct Site(#[allow(dead_code)] u8);

impl Callsite for Site {
    fn set_interest(&self, _: tracing::subscriber::Interest) {}
    fn metadata(&self) -> &tracing::Metadata<'_> {
        unreachable!("keys only")
    }
}

static A: Site = Site(1);
static B: Site = Site(2);

fn describe(msg: &str) -> impl FnOnce() -> (String, String, Level) + '_ {
    move || ("here:1".into(), msg.into(), Level::WARN)
}

#[test]
fn a_kind_gets_its_burst_then_its_rate_and_the_count_of_what_was_dropped() {
    let limit = RateLimit::new(6);
    let t0 = Instant::now();
    let a = || Identifier(&A);
    for i in 0..6 {
        assert_eq!(
            limit.admit(a(), t0, describe("x")),
            Admit::Pass(None),
            "{i}"
        );
    }
    // Past the burst: dropped, the first one's message kept.
    assert_eq!(limit.admit(a(), t0, describe("first dropped")), Admit::Drop);
    for _ in 0..9 {
        assert_eq!(limit.admit(a(), t0, describe("later")), Admit::Drop);
    }
    // Another kind is not affected.
    assert_eq!(
        limit.admit(Identifier(&B), t0, describe("b")),
        Admit::Pass(None)
    );
    // 6 a minute: one more after 10 s, preceded by the count of the dropped ones.
    let t1 = t0 + Duration::from_secs(10);
    match limit.admit(a(), t1, describe("y")) {
        Admit::Pass(Some(d)) => {
            assert_eq!(d.count, 10);
            assert_eq!(d.first, "first dropped");
            assert_eq!(d.level, Level::WARN);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(limit.admit(a(), t1, describe("z")), Admit::Drop);
    // A kind that went quiet is reported by the periodic pass, once.
    let pending = limit.take_pending();
    assert_eq!(pending.len(), 1);
    assert_eq!((pending[0].count, pending[0].first.as_str()), (1, "z"));
    assert!(limit.take_pending().is_empty());
}

#[test]
fn zero_means_no_limit() {
    let limit = RateLimit::new(0);
    let now = Instant::now();
    for _ in 0..1000 {
        assert_eq!(
            limit.admit(Identifier(&A), now, describe("x")),
            Admit::Pass(None)
        );
    }
}

/// Output of a subscriber: registry + the rate limit + fmt into a buffer.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_layer_drops_repeated_lines_and_says_how_many() {
    let out = Buffer::default();
    let writer = out.clone();
    let limit = RateLimit::new(3);
    let subscriber = tracing_subscriber::registry().with(limit.clone()).with(
        tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_ansi(false),
    );
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..50 {
            tracing::warn!(
                attempt = i,
                "upstream 127.0.0.1:1: connection refused; reconnecting"
            );
        }
        tracing::debug!("debug lines are never limited");
        for d in limit.take_pending() {
            limit.report(&d);
        }
    });
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.contains("reconnecting")).count(),
        3 + 1,
        "three lines, then the report quoting the first dropped one: {text}"
    );
    let report = lines.last().unwrap();
    assert!(
        report.contains("47 more log lines like this were dropped")
            && report.contains("dropped=47")
            && report.contains("WARN"),
        "{report}"
    );
}

/// An output that fails every write, as a pipe whose reader is gone does.
struct Closed;

impl Write for Closed {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
}

/// An output whose writes never return, as a full pipe nobody reads.
struct Stuck;

impl Write for Stuck {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        loop {
            std::thread::park();
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_closed_output_never_fails_a_writer() {
    let sink = LogSink::spawn(Closed);
    for _ in 0..100 {
        assert_eq!((&sink).write(b"line\n").unwrap(), 5);
    }
    assert!(sink.flush(Duration::from_secs(5)), "writer thread alive");
}

#[test]
fn a_stuck_output_never_blocks_a_writer() {
    let sink = LogSink::spawn(Stuck);
    let (done, wait) = mpsc::channel();
    let writing = sink.clone();
    std::thread::spawn(move || {
        let line = vec![b'x'; 1023];
        for _ in 0..(4 * MAX_QUEUED_BYTES / 1024) {
            (&writing).write_all(&line).unwrap();
        }
        let _ = done.send(());
    });
    // A hang guard, not a speed target: a blocking sink would never get here.
    wait.recv_timeout(Duration::from_secs(60))
        .expect("writes into a stuck output return");
    // About 3 MiB of the 4 could not be queued.
    assert!(sink.dropped() > 2900, "{}", sink.dropped());
    assert!(
        !sink.flush(Duration::from_millis(100)),
        "the output is stuck"
    );
}
