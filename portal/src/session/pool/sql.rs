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
/// starts with anything else (a comment, a parenthesis, a quoted name): the caller then reads
/// the text in full.
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

/// Whether the first word of `sql` is one of `keywords` (lower case), in any case. Its first
/// letter settles most texts: the word is read only when a keyword starts with it.
pub fn starts_with_any(sql: &[u8], keywords: &[&[u8]]) -> bool {
    let Some(&lead) = sql.iter().find(|b| !b.is_ascii_whitespace()) else {
        return false;
    };
    let lead = lead.to_ascii_lowercase();
    if !keywords.iter().any(|k| k.first() == Some(&lead)) {
        return false;
    }
    let word = first_word(sql);
    keywords.iter().any(|k| word.eq_ignore_ascii_case(k))
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
