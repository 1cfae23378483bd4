//! Frame boundaries without a recursive decoder.
//!
//! [`CommandScanner`] reads untrusted client input: RESP arrays of bulk strings
//! and inline commands, bounded by [`Limits`]. [`ReplyScanner`] reads the
//! upstream's replies (every RESP2/RESP3 type) with one counter of elements still
//! owed instead of a stack, so nesting depth costs nothing. Both keep their
//! position across calls: a partial frame is `Ok(None)` (a normal state, not an
//! error) and the next call resumes where the last one stopped, so a 64 MB value
//! arriving in small reads is scanned once, not once per read.

use memchr::memchr;
use std::ops::Range;

/// Bounds on one client's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bulk_bytes: usize,
    pub max_line_bytes: usize,
    pub max_elements: usize,
}

impl From<&crate::config::LimitsConfig> for Limits {
    fn from(c: &crate::config::LimitsConfig) -> Self {
        Limits {
            max_bulk_bytes: c.max_bulk_bytes,
            max_line_bytes: c.max_line_bytes,
            max_elements: c.max_elements,
        }
    }
}

/// Client input that cannot be a command. The message becomes `-ERR <message>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("Protocol error: {0}")]
    Protocol(&'static str),
    /// Redis's own words for a missing bulk header.
    #[error("Protocol error: expected '$', got '{}'", char::from(*.0))]
    Expected(u8),
    /// `what` says it as Redis would (`invalid bulk length`, ...).
    #[error("Protocol error: {what} (over the proxy's limit of {limit}, {key})")]
    Limit {
        what: &'static str,
        limit: usize,
        key: &'static str,
    },
}

/// How many argument positions a [`Command`] records; enough to classify any
/// command. Longer commands are re-read with [`args_of`] when all args matter.
pub const KEPT_ARGS: usize = 8;

/// One complete client command found at the start of the buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Bytes the command occupies in the buffer.
    pub len: usize,
    /// Number of arguments (the command name included).
    pub argc: usize,
    /// Positions (within the frame) of the first [`KEPT_ARGS`] arguments.
    pub args: ArgRanges,
    /// An inline command (`PING\r\n`): must be re-encoded before forwarding.
    pub inline: bool,
}

/// Positions of at most [`KEPT_ARGS`] arguments, held inline (no allocation
/// per command); reads as a slice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArgRanges {
    ranges: [Range<usize>; KEPT_ARGS],
    len: usize,
}

impl ArgRanges {
    /// Keeps the first [`KEPT_ARGS`]; later ones are dropped.
    pub fn push(&mut self, r: Range<usize>) {
        if self.len < KEPT_ARGS {
            self.ranges[self.len] = r;
            self.len += 1;
        }
    }
}

impl std::ops::Deref for ArgRanges {
    type Target = [Range<usize>];
    fn deref(&self) -> &[Range<usize>] {
        &self.ranges[..self.len]
    }
}

impl FromIterator<Range<usize>> for ArgRanges {
    fn from_iter<I: IntoIterator<Item = Range<usize>>>(iter: I) -> Self {
        let mut a = ArgRanges::default();
        for r in iter {
            a.push(r);
        }
        a
    }
}

impl Command {
    /// Argument `i` of the frame `frame` (the bytes this command was scanned from).
    pub fn arg<'a>(&self, frame: &'a [u8], i: usize) -> Option<&'a [u8]> {
        self.args.get(i).map(|r| &frame[r.clone()])
    }
}

/// The longest `*<count>` or `$<len>` line Redis reads before it gives up
/// (`PROTO_INLINE_MAX_SIZE`).
const MAX_HEADER_LINE: usize = 64 * 1024;

/// Why a header line could not be read.
enum LineError {
    Scan(ScanError),
    NotANumber,
}

impl LineError {
    fn or(self, not_a_number: &'static str) -> ScanError {
        match self {
            LineError::Scan(e) => e,
            LineError::NotANumber => ScanError::Protocol(not_a_number),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmdState {
    Start,
    /// Expecting `$len` of the next argument.
    ArgHeader,
    /// Inside a bulk of `len` bytes plus CRLF that starts at `pos`.
    ArgBody(usize),
}

/// Resumable scanner for client commands. Reset after each complete command.
#[derive(Debug)]
pub struct CommandScanner {
    limits: Limits,
    state: CmdState,
    pos: usize,
    argc: usize,
    remaining: usize,
    args: ArgRanges,
}

impl CommandScanner {
    pub fn new(limits: Limits) -> Self {
        CommandScanner {
            limits,
            state: CmdState::Start,
            pos: 0,
            argc: 0,
            remaining: 0,
            args: ArgRanges::default(),
        }
    }

    fn reset(&mut self) {
        self.state = CmdState::Start;
        self.pos = 0;
        self.argc = 0;
        self.remaining = 0;
        self.args = ArgRanges::default();
    }

    /// Find the first complete command in `buf`, which must start where the last
    /// returned command ended (the caller drops consumed bytes from the front).
    /// `Ok(None)`: more bytes are needed.
    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<Command>, ScanError> {
        loop {
            match self.state {
                CmdState::Start => {
                    let Some(&first) = buf.first() else {
                        return Ok(None);
                    };
                    if first != b'*' {
                        return self.scan_inline(buf);
                    }
                    let Some((n, next)) = self
                        .line_int(buf, 1, "too big mbulk count string")
                        .map_err(|e| e.or("invalid multibulk length"))?
                    else {
                        return Ok(None);
                    };
                    if n > i64::from(i32::MAX) {
                        return Err(ScanError::Protocol("invalid multibulk length"));
                    }
                    let n = n.max(0) as usize;
                    if n > self.limits.max_elements {
                        return Err(ScanError::Limit {
                            what: "invalid multibulk length",
                            limit: self.limits.max_elements,
                            key: "limits.max_elements",
                        });
                    }
                    if n == 0 {
                        // `*0\r\n` (or a negative count) is an empty command:
                        // Redis ignores it, so do we.
                        let len = next;
                        self.reset();
                        return Ok(Some(Command {
                            len,
                            argc: 0,
                            args: ArgRanges::default(),
                            inline: false,
                        }));
                    }
                    self.argc = n;
                    self.remaining = n;
                    self.pos = next;
                    self.state = CmdState::ArgHeader;
                }
                CmdState::ArgHeader => {
                    let Some(&first) = buf.get(self.pos) else {
                        return Ok(None);
                    };
                    if first != b'$' {
                        return Err(ScanError::Expected(first));
                    }
                    let Some((len, next)) = self
                        .line_int(buf, self.pos + 1, "too big bulk count string")
                        .map_err(|e| e.or("invalid bulk length"))?
                    else {
                        return Ok(None);
                    };
                    if len < 0 {
                        return Err(ScanError::Protocol("invalid bulk length"));
                    }
                    let len = len as usize;
                    if len > self.limits.max_bulk_bytes {
                        return Err(ScanError::Limit {
                            what: "invalid bulk length",
                            limit: self.limits.max_bulk_bytes,
                            key: "limits.max_bulk_bytes",
                        });
                    }
                    self.pos = next;
                    self.state = CmdState::ArgBody(len);
                }
                CmdState::ArgBody(len) => {
                    let end = self.pos + len;
                    if buf.len() < end + 2 {
                        return Ok(None);
                    }
                    // Like Redis, take the two bytes after the bulk as its
                    // CRLF without looking at them.
                    self.args.push(self.pos..end);
                    self.pos = end + 2;
                    self.remaining -= 1;
                    if self.remaining == 0 {
                        let cmd = Command {
                            len: self.pos,
                            argc: self.argc,
                            args: std::mem::take(&mut self.args),
                            inline: false,
                        };
                        self.reset();
                        return Ok(Some(cmd));
                    }
                    self.state = CmdState::ArgHeader;
                }
            }
        }
    }

    /// Read a `<int>\r\n` header line starting at `from`. Returns the value and
    /// the position after the CRLF.
    /// A line without CR in its first 64 KB gets `too_big` (Redis's words);
    /// a line that is not a number gets [`LineError::NotANumber`].
    fn line_int(
        &self,
        buf: &[u8],
        from: usize,
        too_big: &'static str,
    ) -> Result<Option<(i64, usize)>, LineError> {
        let window = &buf[from.min(buf.len())..];
        // A length line is a few bytes: a plain loop over the first 33 costs
        // less than memchr's set-up, and this runs for every argument; longer
        // lines (never a valid length) are searched only up to Redis's limit.
        let near = window.iter().take(33).position(|&b| b == b'\r');
        let cr = near.or_else(|| {
            (window.len() > 33)
                .then(|| memchr(b'\r', &window[..window.len().min(MAX_HEADER_LINE + 1)]))
                .flatten()
        });
        let Some(cr) = cr else {
            if window.len() > MAX_HEADER_LINE {
                return Err(LineError::Scan(ScanError::Protocol(too_big)));
            }
            return Ok(None);
        };
        if cr > MAX_HEADER_LINE {
            return Err(LineError::Scan(ScanError::Protocol(too_big)));
        }
        let Some(&lf) = window.get(cr + 1) else {
            return Ok(None);
        };
        if lf != b'\n' {
            return Err(LineError::NotANumber);
        }
        let n = parse_int(&window[..cr]).ok_or(LineError::NotANumber)?;
        Ok(Some((n, from + cr + 2)))
    }

    /// An inline command: one line of space-separated words, as telnet sends.
    fn scan_inline(&mut self, buf: &[u8]) -> Result<Option<Command>, ScanError> {
        let search_from = self.pos;
        let Some(nl) = memchr(b'\n', &buf[search_from..]).map(|i| i + search_from) else {
            if buf.len() > self.limits.max_line_bytes {
                return Err(ScanError::Limit {
                    what: "too big inline request",
                    limit: self.limits.max_line_bytes,
                    key: "limits.max_line_bytes",
                });
            }
            self.pos = buf.len();
            return Ok(None);
        };
        if nl > self.limits.max_line_bytes {
            return Err(ScanError::Limit {
                what: "too big inline request",
                limit: self.limits.max_line_bytes,
                key: "limits.max_line_bytes",
            });
        }
        let line_end = if nl > 0 && buf[nl - 1] == b'\r' {
            nl - 1
        } else {
            nl
        };
        let line = &buf[..line_end];
        // An HTTP request (a browser page can send one to 127.0.0.1): Redis
        // closes a connection whose command is POST or Host: so that nothing
        // after it runs; so does the proxy (this error closes the client).
        let first = line.split(|&b| is_blank(b)).find(|w| !w.is_empty());
        if first
            .is_some_and(|w| w.eq_ignore_ascii_case(b"post") || w.eq_ignore_ascii_case(b"host:"))
        {
            return Err(ScanError::Protocol(
                "POST or Host: (an HTTP request?) is not a Redis command; connection closed",
            ));
        }
        // Quoted words are unescaped by [`inline_args`]: their positions in
        // the line are not their bytes, so none are kept (the session turns
        // every inline command into a RESP array with `inline_args`).
        let (argc, words) = if memchr::memchr2(b'"', b'\'', line).is_some() {
            (inline_args(line)?.len(), Vec::new())
        } else {
            let words = split_inline(line);
            (words.len(), words)
        };
        if argc > self.limits.max_elements {
            return Err(ScanError::Limit {
                what: "invalid multibulk length",
                limit: self.limits.max_elements,
                key: "limits.max_elements",
            });
        }
        let cmd = Command {
            len: nl + 1,
            argc,
            args: words.into_iter().take(KEPT_ARGS).collect(),
            inline: true,
        };
        self.reset();
        Ok(Some(cmd))
    }
}

fn is_blank(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// Word ranges of an inline line without quotes: runs of non-blank bytes.
fn split_inline(line: &[u8]) -> Vec<Range<usize>> {
    let mut words = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && is_blank(line[i]) {
            i += 1;
        }
        let start = i;
        while i < line.len() && !is_blank(line[i]) {
            i += 1;
        }
        if i > start {
            words.push(start..i);
        }
    }
    words
}

/// The words of an inline command line as Redis reads them (its
/// `sdssplitargs`): blanks separate words; `"..."` takes the escapes `\n`,
/// `\r`, `\t`, `\b`, `\a`, `\\`, `\"` and `\xHH`; `'...'` takes `\'`; a
/// closing quote must end its word. An open quote is Redis's "unbalanced
/// quotes" error.
pub fn inline_args(line: &[u8]) -> Result<Vec<Vec<u8>>, ScanError> {
    const UNBALANCED: ScanError = ScanError::Protocol("unbalanced quotes in request");
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut words = Vec::new();
    let mut i = 0;
    loop {
        while i < line.len() && is_blank(line[i]) {
            i += 1;
        }
        if i >= line.len() {
            return Ok(words);
        }
        let mut word = Vec::new();
        let (mut dq, mut sq) = (false, false);
        loop {
            let Some(&c) = line.get(i) else {
                if dq || sq {
                    return Err(UNBALANCED);
                }
                break;
            };
            if dq {
                match c {
                    b'\\'
                        if i + 3 < line.len()
                            && line[i + 1] == b'x'
                            && hex(line[i + 2]).is_some()
                            && hex(line[i + 3]).is_some() =>
                    {
                        let (h, l) = (hex(line[i + 2]), hex(line[i + 3]));
                        word.push(h.unwrap_or(0) * 16 + l.unwrap_or(0));
                        i += 3;
                    }
                    b'\\' if i + 1 < line.len() => {
                        i += 1;
                        word.push(match line[i] {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                    }
                    b'"' => {
                        if line.get(i + 1).is_some_and(|&n| !is_blank(n)) {
                            return Err(UNBALANCED);
                        }
                        i += 1;
                        break;
                    }
                    _ => word.push(c),
                }
            } else if sq {
                match c {
                    b'\\' if line.get(i + 1) == Some(&b'\'') => {
                        i += 1;
                        word.push(b'\'');
                    }
                    b'\'' => {
                        if line.get(i + 1).is_some_and(|&n| !is_blank(n)) {
                            return Err(UNBALANCED);
                        }
                        i += 1;
                        break;
                    }
                    _ => word.push(c),
                }
            } else {
                // A NUL byte is part of its word (as in split_inline): Redis
                // reads inline lines as C strings, and breaking here without
                // moving on looped for ever pushing empty words.
                match c {
                    c if is_blank(c) => break,
                    b'"' => dq = true,
                    b'\'' => sq = true,
                    _ => word.push(c),
                }
            }
            i += 1;
        }
        words.push(word);
    }
}

/// Every argument of a complete command frame, for the few commands that need
/// more than [`KEPT_ARGS`] (SUBSCRIBE with many channels).
pub fn args_of<'a>(frame: &'a [u8], cmd: &Command) -> Vec<&'a [u8]> {
    if cmd.inline && cmd.argc > KEPT_ARGS {
        // The line again, without its `\r\n` (or `\n`): every word.
        let mut end = frame.len();
        while end > 0 && (frame[end - 1] == b'\n' || frame[end - 1] == b'\r') {
            end -= 1;
        }
        let words = split_inline(&frame[..end]);
        return words.into_iter().map(|r| &frame[r]).collect();
    }
    if cmd.inline || cmd.argc <= KEPT_ARGS {
        return cmd.args.iter().map(|r| &frame[r.clone()]).collect();
    }
    let mut out = Vec::with_capacity(cmd.argc);
    let mut pos = memchr(b'\n', frame).map_or(frame.len(), |i| i + 1);
    while pos < frame.len() {
        let Some(nl) = memchr(b'\n', &frame[pos..]) else {
            break;
        };
        let len = parse_int(&frame[pos + 1..pos + nl - 1]).unwrap_or(0) as usize;
        let start = pos + nl + 1;
        out.push(&frame[start..start + len]);
        pos = start + len + 2;
    }
    out
}

fn parse_int(digits: &[u8]) -> Option<i64> {
    let (neg, digits) = match digits.first() {
        Some(b'-') => (true, &digits[1..]),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add((d - b'0') as i64)?;
    }
    Some(if neg { -n } else { n })
}

/// One complete reply found at the start of the upstream buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub len: usize,
    /// A RESP3 push frame (`>`): out of band, not the answer to a command.
    pub push: bool,
    /// An error reply (`-` or `!`).
    pub error: bool,
}

/// Upstream sent something that is not RESP: the connection must be retired.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream protocol error: {0}")]
pub struct ReplyError(pub &'static str);

/// Resumable scanner for upstream replies of any RESP2/RESP3 type.
#[derive(Debug, Default)]
pub struct ReplyScanner {
    pos: usize,
    /// Elements still owed before the top-level reply is complete.
    remaining: usize,
    started: bool,
    push: bool,
    error: bool,
}

impl ReplyScanner {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn scan(&mut self, buf: &[u8]) -> Result<Option<Reply>, ReplyError> {
        if !self.started {
            let Some(&first) = buf.first() else {
                return Ok(None);
            };
            self.started = true;
            self.remaining = 1;
            self.push = first == b'>';
            self.error = first == b'-' || first == b'!';
        }
        while self.remaining > 0 {
            let Some(&kind) = buf.get(self.pos) else {
                return Ok(None);
            };
            let Some(cr) = memchr(b'\n', &buf[self.pos..]) else {
                return Ok(None);
            };
            let line_end = self.pos + cr; // index of '\n'
                                          // A line is at least its type byte and CRLF: an empty line
                                          // (`\r\n`) is not a reply.
            if cr < 2 || buf[line_end - 1] != b'\r' {
                return Err(ReplyError("empty line or line not terminated by CRLF"));
            }
            let body = &buf[self.pos + 1..line_end - 1];
            let next = line_end + 1;
            match kind {
                b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => {
                    self.pos = next;
                    self.remaining -= 1;
                }
                b'$' | b'!' | b'=' => {
                    let n = parse_int(body).ok_or(ReplyError("bad bulk length"))?;
                    if n < 0 {
                        self.pos = next;
                    } else {
                        let end = usize::try_from(n)
                            .ok()
                            .and_then(|n| next.checked_add(n)?.checked_add(2))
                            .ok_or(ReplyError("bad bulk length"))?;
                        if buf.len() < end {
                            return Ok(None);
                        }
                        self.pos = end;
                    }
                    self.remaining -= 1;
                }
                b'*' | b'~' | b'>' | b'%' => {
                    let n = parse_int(body).ok_or(ReplyError("bad aggregate length"))?;
                    self.pos = next;
                    self.remaining -= 1;
                    if n > 0 {
                        let n = n as usize;
                        let add = if kind == b'%' {
                            n.checked_mul(2)
                        } else {
                            Some(n)
                        };
                        self.remaining = add
                            .and_then(|a| self.remaining.checked_add(a))
                            .ok_or(ReplyError("bad aggregate length"))?;
                    }
                }
                b'|' => {
                    // Attributes precede the element they describe: they add
                    // their pairs without taking the element's place.
                    let n = parse_int(body).ok_or(ReplyError("bad attribute length"))?;
                    self.pos = next;
                    self.remaining = (n.max(0) as usize)
                        .checked_mul(2)
                        .and_then(|a| self.remaining.checked_add(a))
                        .ok_or(ReplyError("bad attribute length"))?;
                }
                _ => return Err(ReplyError("unknown reply type byte")),
            }
        }
        let reply = Reply {
            len: self.pos,
            push: self.push,
            error: self.error,
        };
        *self = ReplyScanner::default();
        Ok(Some(reply))
    }
}

#[cfg(test)]
mod tests;
