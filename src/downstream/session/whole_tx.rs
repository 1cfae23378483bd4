//! A transaction that arrives whole: `MULTI`, plain commands, then `EXEC`
//! or `DISCARD`, all in the bytes already read. Written to the client's
//! shared connection as one piece, it runs there as it would on a
//! connection of its own (nothing of another client can come between its
//! commands, and EXEC or DISCARD leaves the connection as it found it), so
//! it needs no dedicated connection (issue 19: pooled client libraries
//! alternate such blocks with plain commands).

use crate::resp::scan::{self, CommandScanner, Limits};

/// What one command inside the block is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// Stateless: may run inside the block on a shared connection.
    Plain,
    /// `EXEC` or `DISCARD` (with no argument): the block ends.
    End,
    /// Anything else (state the proxy tracks, pub/sub, a second MULTI,
    /// WATCH, an inline command): not a block the proxy sends whole.
    Other,
}

/// Longest block sent whole (commands, MULTI and EXEC included); a longer
/// one takes a dedicated connection.
pub(super) const MAX_COMMANDS: usize = 1024;

/// The block at the front of `buf` (which starts with its MULTI): its
/// length in bytes and its number of commands, if all of it is there and
/// every command in it is [`Part::Plain`] up to its end.
pub(super) fn whole_tx(
    buf: &[u8],
    limits: Limits,
    mut part: impl FnMut(&[u8], &scan::Command) -> Part,
) -> Option<(usize, usize)> {
    let mut scanner = CommandScanner::new(limits);
    let mut at = 0;
    for n in 1..=MAX_COMMANDS {
        let cmd = scanner.scan(&buf[at..]).ok()??;
        if cmd.inline || cmd.argc == 0 {
            return None;
        }
        let frame = &buf[at..at + cmd.len];
        at += cmd.len;
        if n == 1 {
            continue; // the MULTI
        }
        match part(frame, &cmd) {
            Part::Plain => {}
            Part::End => return Some((at, n)),
            Part::Other => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::command;

    fn limits() -> Limits {
        Limits {
            max_bulk_bytes: 1 << 20,
            max_line_bytes: 1 << 16,
            max_elements: 1 << 16,
        }
    }

    fn by_name(frame: &[u8], cmd: &scan::Command) -> Part {
        let name = cmd.arg(frame, 0).unwrap_or_default().to_ascii_uppercase();
        match &name[..] {
            b"EXEC" | b"DISCARD" if cmd.argc == 1 => Part::End,
            b"GET" | b"SET" | b"INCR" => Part::Plain,
            _ => Part::Other,
        }
    }

    fn cat(cmds: &[&[&[u8]]]) -> Vec<u8> {
        cmds.iter().flat_map(|c| command(c).to_vec()).collect()
    }

    #[test]
    fn a_whole_block_and_what_follows() {
        let block = cat(&[
            &[b"MULTI"],
            &[b"INCR", b"n"],
            &[b"SET", b"k", b"v"],
            &[b"EXEC"],
        ]);
        let mut buf = block.clone();
        buf.extend_from_slice(&command(&[b"GET", b"k"]));
        assert_eq!(whole_tx(&buf, limits(), by_name), Some((block.len(), 4)));
        let discard = cat(&[&[b"MULTI"], &[b"DISCARD"]]);
        assert_eq!(
            whole_tx(&discard, limits(), by_name),
            Some((discard.len(), 2))
        );
    }

    #[test]
    fn not_whole_or_not_plain() {
        // Cut anywhere: not all there yet.
        let block = cat(&[&[b"MULTI"], &[b"INCR", b"n"], &[b"EXEC"]]);
        for cut in 0..block.len() {
            assert_eq!(whole_tx(&block[..cut], limits(), by_name), None, "{cut}");
        }
        for inner in [
            &[&b"WATCH"[..], b"k"][..],
            &[b"MULTI"],
            &[b"SUBSCRIBE", b"c"],
            &[b"EXEC", b"x"],
        ] {
            let buf = cat(&[&[b"MULTI"], inner, &[b"EXEC"]]);
            assert_eq!(whole_tx(&buf, limits(), by_name), None, "{inner:?}");
        }
        let mut inline = command(&[b"MULTI"]).to_vec();
        inline.extend_from_slice(b"GET k\r\nEXEC\r\n");
        assert_eq!(whole_tx(&inline, limits(), by_name), None);
        // Too long to send whole.
        let mut long = command(&[b"MULTI"]).to_vec();
        for _ in 0..MAX_COMMANDS {
            long.extend_from_slice(&command(&[b"INCR", b"n"]));
        }
        long.extend_from_slice(&command(&[b"EXEC"]));
        assert_eq!(whole_tx(&long, limits(), by_name), None);
    }
}
