use super::*;

fn limits() -> Limits {
    Limits {
        max_bulk_bytes: 1024,
        max_line_bytes: 64,
        max_elements: 16,
    }
}

type Scanned = Vec<(Vec<Vec<u8>>, usize)>;

fn scan_all(input: &[u8]) -> Result<Scanned, ScanError> {
    let mut s = CommandScanner::new(limits());
    let mut out = Vec::new();
    let mut buf = input;
    while let Some(cmd) = s.scan(buf)? {
        let frame = &buf[..cmd.len];
        out.push((
            args_of(frame, &cmd).iter().map(|a| a.to_vec()).collect(),
            cmd.argc,
        ));
        buf = &buf[cmd.len..];
    }
    Ok(out)
}

#[test]
fn array_of_bulks() {
    let got = scan_all(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*1\r\n$4\r\nPING\r\n").unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, vec![b"GET".to_vec(), b"k".to_vec()]);
    assert_eq!(got[1].0, vec![b"PING".to_vec()]);
}

#[test]
fn every_byte_boundary_is_a_partial_frame() {
    let input: &[u8] = b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$5\r\nv\0\xff\r\n\r\n";
    for split in 0..input.len() {
        let mut s = CommandScanner::new(limits());
        // Feed a growing prefix, as reads would.
        assert_eq!(s.scan(&input[..split]).unwrap(), None, "split {split}");
        let cmd = s.scan(input).unwrap().expect("complete");
        assert_eq!(cmd.len, input.len());
        assert_eq!(cmd.arg(input, 1), Some(&b"k\r\n"[..]));
        assert_eq!(cmd.arg(input, 2), Some(&b"v\0\xff\r\n"[..]));
    }
}

#[test]
fn inline_commands() {
    let got = scan_all(b"PING\r\nSET  k\tv\nGET k\r\n").unwrap();
    assert_eq!(got[0].0, vec![b"PING".to_vec()]);
    assert_eq!(
        got[1].0,
        vec![b"SET".to_vec(), b"k".to_vec(), b"v".to_vec()]
    );
    assert_eq!(got[2].0, vec![b"GET".to_vec(), b"k".to_vec()]);
    // A blank line is an empty command (Redis ignores it).
    assert_eq!(scan_all(b"\r\n").unwrap()[0].1, 0);
    // More words than the scanner keeps positions for: all of them.
    let line: &[u8] = b"MSET a 1 b 2 c 3 d 4 e 5\r\n";
    let cmd = CommandScanner::new(limits()).scan(line).unwrap().unwrap();
    assert_eq!(cmd.argc, 11);
    let words: Vec<&[u8]> = args_of(line, &cmd);
    assert_eq!(words.len(), 11);
    assert_eq!((words[0], words[10]), (&b"MSET"[..], &b"5"[..]));
    for split in 0..9 {
        let mut s = CommandScanner::new(limits());
        assert_eq!(s.scan(&b"GET k\r\n"[..split.min(6)]).unwrap(), None);
    }
}

#[test]
fn limits_are_enforced() {
    let mut s = CommandScanner::new(limits());
    let e = s.scan(b"*1\r\n$1025\r\n").unwrap_err();
    assert!(matches!(
        e,
        ScanError::Limit {
            key: "limits.max_bulk_bytes",
            ..
        }
    ));
    assert!(e.to_string().contains("1024"));
    let mut s = CommandScanner::new(limits());
    let e = s.scan(b"*17\r\n").unwrap_err();
    assert!(matches!(
        e,
        ScanError::Limit {
            key: "limits.max_elements",
            ..
        }
    ));
    let mut s = CommandScanner::new(limits());
    let e = s.scan(&[b'a'; 65]).unwrap_err();
    assert!(matches!(
        e,
        ScanError::Limit {
            key: "limits.max_line_bytes",
            ..
        }
    ));
    let mut s = CommandScanner::new(limits());
    let e = s
        .scan(b"*1\r\n$99999999999999999999999999999\r\n")
        .unwrap_err();
    assert!(matches!(e, ScanError::Protocol(_)));
}

#[test]
fn malformed_frames() {
    for bad in [
        &b"*1\r\n+PING\r\n"[..],
        b"*1\r\n$-1\r\n",
        b"*x\r\n",
        b"*1\r\r",
        b"SET \"k\"v\r\n",
    ] {
        let mut s = CommandScanner::new(limits());
        assert!(s.scan(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn length_lines_up_to_32_bytes() {
    let ok = format!("*1\r\n${}4\r\nPING\r\n", "0".repeat(18));
    let mut s = CommandScanner::new(limits());
    assert_eq!(s.scan(ok.as_bytes()).unwrap().unwrap().len, ok.len());
    // A CR in the first 33 bytes is found by the short loop, later ones
    // by memchr up to Redis's 64 KB: too many digits either way is Redis's
    // "invalid bulk length"; no CR yet, under 64 KB: wait for more.
    let cases = [
        (
            format!("*1\r\n${}\r\n", "0".repeat(32)),
            Err("invalid bulk length"),
        ),
        (
            format!("*1\r\n${}\r\n", "0".repeat(33)),
            Err("invalid bulk length"),
        ),
        (
            format!("*1\r\n${}\r\n", "0".repeat(1000)),
            Err("invalid bulk length"),
        ),
        (format!("*1\r\n${}", "1".repeat(33)), Ok(())),
        (format!("*1\r\n${}", "1".repeat(32)), Ok(())),
        (
            format!("*1\r\n${}", "1".repeat(70_000)),
            Err("too big bulk count string"),
        ),
    ];
    for (input, want) in cases {
        let mut s = CommandScanner::new(limits());
        let got = s.scan(input.as_bytes());
        match want {
            Ok(()) => assert_eq!(got, Ok(None), "{input:?}"),
            Err(e) => assert_eq!(got, Err(ScanError::Protocol(e)), "{input:?}"),
        }
    }
}

#[test]
fn reply_lines_longer_than_32_bytes() {
    let line = format!("+{}\r\n", "a".repeat(100));
    let reply = format!("*2\r\n{line}-ERR {}\r\n", "e".repeat(40));
    for cut in 0..reply.len() {
        let mut s = ReplyScanner::new();
        assert_eq!(s.scan(&reply.as_bytes()[..cut]), Ok(None), "cut at {cut}");
        let r = s.scan(reply.as_bytes()).unwrap().unwrap();
        assert_eq!(r.len, reply.len());
    }
    let mut s = ReplyScanner::new();
    let bad = format!("+{}\n", "a".repeat(40));
    assert!(s.scan(bad.as_bytes()).is_err());
}

#[test]
fn deep_nesting_in_client_input_is_refused_without_recursion() {
    // `*1\r\n` repeated: a recursive decoder would descend once per level.
    let input = b"*1\r\n".repeat(100_000);
    let mut s = CommandScanner::new(limits());
    assert!(matches!(s.scan(&input), Err(ScanError::Expected(b'*'))));
}

#[test]
fn deep_nesting_in_replies_uses_constant_state() {
    let mut input = b"*1\r\n".repeat(1_000_000);
    input.extend_from_slice(b":1\r\n");
    let mut s = ReplyScanner::new();
    assert_eq!(s.scan(&input[..input.len() - 1]).unwrap(), None);
    let r = s.scan(&input).unwrap().unwrap();
    assert_eq!(r.len, input.len());
}

#[test]
fn replies_of_every_type() {
    let cases: &[&[u8]] = &[
        b"+OK\r\n",
        b"-ERR x\r\n",
        b":42\r\n",
        b"$-1\r\n",
        b"$0\r\n\r\n",
        b"$5\r\nhe\r\no\r\n",
        b"*-1\r\n",
        b"*0\r\n",
        b"*2\r\n$1\r\na\r\n*2\r\n:1\r\n:2\r\n",
        b"_\r\n",
        b"#t\r\n",
        b",1.5\r\n",
        b"(12345678901234567890\r\n",
        b"!3\r\nerr\r\n",
        b"=7\r\ntxt:abc\r\n",
        b"%2\r\n+a\r\n:1\r\n+b\r\n*1\r\n:2\r\n",
        b"~2\r\n+a\r\n+b\r\n",
        b"|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n",
        b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n",
    ];
    for case in cases {
        for split in 0..case.len() {
            let mut s = ReplyScanner::new();
            assert_eq!(s.scan(&case[..split]).unwrap(), None, "{case:?} at {split}");
            let r = s.scan(case).unwrap().unwrap();
            assert_eq!(r.len, case.len(), "{:?}", String::from_utf8_lossy(case));
        }
    }
    let mut s = ReplyScanner::new();
    assert!(s.scan(b">1\r\n+x\r\n").unwrap().unwrap().push);
    let mut s = ReplyScanner::new();
    assert!(s.scan(b"-ERR\r\n").unwrap().unwrap().error);
    let mut s = ReplyScanner::new();
    assert!(s.scan(b"?x\r\n").is_err());
}

/// Regression: an empty line from the server (`\r\n`, alone or inside an
/// aggregate) panicked the scanner, and with it the shared connection's
/// task. Any bytes give a reply, `None` or an error.
#[test]
fn no_server_bytes_panic_the_reply_scanner() {
    for bad in [
        &b"\r\n"[..],
        b"*2\r\n\r\n",
        b"\n",
        b"*1\r\n\n",
        b"$9223372036854775807\r\n",
        b"*9223372036854775807\r\n",
        b"%9223372036854775807\r\n",
        b"*9223372036854775807\r\n*9223372036854775807\r\n",
        b"|9223372036854775807\r\n",
    ] {
        let mut s = ReplyScanner::new();
        let _ = s.scan(bad);
    }
    assert!(ReplyScanner::new().scan(b"\r\n").is_err());
    assert!(ReplyScanner::new().scan(b"*2\r\n\r\n").is_err());
    // Every short byte string, in every split.
    let alphabet = b"*$%>|+-:_\r\n019";
    let mut input = [0u8; 4];
    for n in 0..alphabet.len().pow(4) {
        let mut k = n;
        for b in input.iter_mut() {
            *b = alphabet[k % alphabet.len()];
            k /= alphabet.len();
        }
        let mut s = ReplyScanner::new();
        let _ = s.scan(&input[..2]);
        let _ = s.scan(&input);
    }
}

#[test]
fn protocol_errors_say_what_redis_says() {
    let err = |input: &[u8]| {
        CommandScanner::new(limits())
            .scan(input)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        err(b"*1\r\nfoo\r\n"),
        "Protocol error: expected '$', got 'f'"
    );
    assert_eq!(
        err(b"*3000000000\r\n"),
        "Protocol error: invalid multibulk length"
    );
    assert_eq!(err(b"*x\r\n"), "Protocol error: invalid multibulk length");
    assert_eq!(
        err(b"*1\r\n$-10\r\n"),
        "Protocol error: invalid bulk length"
    );
    assert_eq!(
        err(b"*1\r\n$blabla\r\n"),
        "Protocol error: invalid bulk length"
    );
    assert!(err(b"*17\r\n").starts_with("Protocol error: invalid multibulk length ("));
    assert!(err(b"*1\r\n$1025\r\n").starts_with("Protocol error: invalid bulk length ("));
    assert!(err(&[b'a'; 65]).starts_with("Protocol error: too big inline request ("));
    let mut long = b"*".to_vec();
    long.extend(std::iter::repeat_n(b'1', 70_000));
    assert_eq!(err(&long), "Protocol error: too big mbulk count string");
    assert_eq!(
        err(b"SET k \"v\r\n"),
        "Protocol error: unbalanced quotes in request"
    );
    // A negative count is an empty command, as in Redis.
    let cmd = CommandScanner::new(limits())
        .scan(b"*-10\r\n")
        .unwrap()
        .unwrap();
    assert_eq!((cmd.argc, cmd.len), (0, 6));
}

#[test]
fn inline_arguments_as_redis_splits_them() {
    let words = |line: &[u8]| inline_args(line).unwrap();
    assert_eq!(words(b"set k \"a b\""), [&b"set"[..], b"k", b"a b"]);
    assert_eq!(words(b"  a\t'b c'  "), [&b"a"[..], b"b c"]);
    assert_eq!(
        words(br#""\x41\n\\\"" 'it\'s'"#),
        [&b"A\n\\\""[..], b"it's"]
    );
    assert_eq!(words(br#"x"y z""#), [&b"xy z"[..]]);
    assert_eq!(words(b""), Vec::<Vec<u8>>::new());
    assert_eq!(words(b"\0 a\0b"), [&b"\0"[..], b"a\0b"]);
    assert_eq!(words(br#""""#), [&b""[..]]);
    for bad in [&br#""abc"#[..], br#"'abc"#, br#""a"b"#, br#"'a'b"#] {
        assert!(
            inline_args(bad).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}
