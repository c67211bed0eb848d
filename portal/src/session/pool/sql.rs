//! The first look the pool takes at a query's text (pure), in place and without allocating:
//! its first keyword, whether it holds more than one statement, whether a word occurs in it.
//! Most statements (SELECT, INSERT, UPDATE, DELETE, BEGIN, COMMIT, …) are told apart from the
//! few that leave session state or that the portal answers itself by their first keyword
//! alone; only those few, and text this look cannot settle (a leading comment, several
//! statements), are read in full by [`pinning`](super::pinning) and
//! [`statements`](super::statements).
//!
//! May import: nothing of the crate.

/// The first word of `sql`: the ASCII letters after leading whitespace. Empty when the text
/// starts with anything else (a comment, a parenthesis, a quoted name). What
/// [`starts_with_any`] compares keywords with, read in full (the tests' reference).
#[cfg(test)]
pub fn first_word(sql: &[u8]) -> &[u8] {
    let start = sql
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(sql.len());
    let rest = &sql[start..];
    let len = rest
        .iter()
        .position(|b| !b.is_ascii_alphabetic())
        .unwrap_or(rest.len());
    &rest[..len]
}

/// The first byte of `sql` after leading whitespace, in lower case.
#[inline]
pub fn lead(sql: &[u8]) -> Option<u8> {
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    Some(sql[start].to_ascii_lowercase())
}

/// Whether the first word of `sql` is one of `keywords` (lower-case letters), in any case.
/// Inlined where it is called: text whose first letter starts none of them (most) is
/// settled by one byte compare per keyword, the others by comparing the keyword's length of
/// bytes and the byte after them, without reading the word to its end.
#[inline]
pub fn starts_with_any(sql: &[u8], keywords: &[&[u8]]) -> bool {
    let Some(start) = sql.iter().position(|b| !b.is_ascii_whitespace()) else {
        return false;
    };
    let lead = sql[start].to_ascii_lowercase();
    keywords
        .iter()
        .any(|k| k.first() == Some(&lead) && is_word_at(sql, start, k))
}

/// Whether `keyword` (letters) is the whole word at `start` of `sql`, in any case.
fn is_word_at(sql: &[u8], start: usize, keyword: &[u8]) -> bool {
    let end = start + keyword.len();
    sql.get(start..end)
        .is_some_and(|w| w.eq_ignore_ascii_case(keyword))
        && !sql.get(end).is_some_and(u8::is_ascii_alphabetic)
}

/// Whether `sql` may hold more than one statement: a `;` with more than whitespace, `;` and
/// a terminating NUL after it. A `;` inside a literal or comment counts too (the caller reads
/// the text in full then).
pub fn several_statements(sql: &[u8]) -> bool {
    match memchr::memchr(b';', sql) {
        None => false,
        Some(i) => sql[i..]
            .iter()
            .any(|&b| !(b == b';' || b == 0 || b.is_ascii_whitespace())),
    }
}

/// Whether `word` (lower-case ASCII letters and `_`) occurs in `sql`, in any case.
pub fn contains_ignore_case(sql: &[u8], word: &[u8]) -> bool {
    let Some((&first, tail)) = word.split_first() else {
        return true;
    };
    let mut at = 0;
    while let Some(i) = memchr::memchr2(first, first.to_ascii_uppercase(), &sql[at..]) {
        let start = at + i + 1;
        if sql
            .get(start..start + tail.len())
            .is_some_and(|s| s.eq_ignore_ascii_case(tail))
        {
            return true;
        }
        at = start;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_word_is_its_letters_after_whitespace() {
        assert_eq!(first_word(b"  \n\tSELECT 1"), b"SELECT");
        assert_eq!(first_word(b"listen\"x\""), b"listen");
        assert_eq!(first_word(b"set_config('a', 'b', false)"), b"set");
        assert_eq!(first_word(b"/* c */ LISTEN x"), b"");
        assert_eq!(first_word(b"(SELECT 1)"), b"");
        assert_eq!(first_word(b""), b"");
        assert_eq!(first_word(b"   "), b"");
        assert!(starts_with_any(
            b"Discard ALL",
            &[b"deallocate", b"discard"]
        ));
        assert!(!starts_with_any(b"discarded", &[b"discard"]));
    }

    /// Every text of up to five bytes over letters of the keywords, other letters,
    /// whitespace and punctuation: the keyword compare says what the whole first word says.
    #[test]
    fn starts_with_any_agrees_with_the_first_word() {
        let alphabet = b"sEtx _(\n";
        let sets: [&[&[u8]]; 3] = [&[b"set"], &[b"s", b"setx"], &[b"reset", b"set", b"tx"]];
        let mut text = Vec::new();
        for len in 0..=5u32 {
            for mut n in 0..alphabet.len().pow(len) {
                text.clear();
                for _ in 0..len {
                    text.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                for keywords in sets {
                    let word = first_word(&text);
                    let want = keywords.iter().any(|k| word.eq_ignore_ascii_case(k));
                    assert_eq!(
                        starts_with_any(&text, keywords),
                        want,
                        "{:?} {keywords:?}",
                        String::from_utf8_lossy(&text)
                    );
                }
            }
        }
    }

    #[test]
    fn several_statements_need_more_than_a_trailing_semicolon() {
        assert!(!several_statements(b"SELECT 1"));
        assert!(!several_statements(b"SELECT 1;\0"));
        assert!(!several_statements(b"SELECT 1 ; ;\n\0"));
        assert!(several_statements(b"SELECT 1; LISTEN x"));
        assert!(several_statements(b"SELECT ';x'"));
    }

    #[test]
    fn a_word_is_found_in_any_case() {
        assert!(contains_ignore_case(
            b"SELECT PG_Advisory_Lock(1)",
            b"advisory"
        ));
        assert!(contains_ignore_case(b"aadvisory", b"advisory"));
        assert!(!contains_ignore_case(b"SELECT advisor", b"advisory"));
        assert!(!contains_ignore_case(b"", b"advisory"));
        assert!(contains_ignore_case(b"x", b""));
    }
}
