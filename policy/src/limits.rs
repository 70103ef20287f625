//! How complex one statement may be, checked on its tokens before parsing.
//!
//! sqlparser builds a chain like `a = 1 OR a = 2 OR ...` as a tree as deep
//! as the chain is long, without its recursion limit, and lowering,
//! binding, printing, evaluating and dropping such trees recurse: a query
//! of ten kilobytes overflowed a 2 MiB thread stack (a tokio worker's), and
//! a stack overflow aborts the process. So a statement's operators,
//! keywords and parenthesis depth are counted first (a bound on the depth
//! of its tree), iteratively, and a statement over the limit is refused
//! before a tree exists. SQLite itself refuses expressions deeper than
//! 1000.

use sqlparser::dialect::Dialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Location, Token, Tokenizer};

/// The most operators, keywords and levels of parentheses one statement
/// (a subscription query, or one `CREATE POLICY`) may have.
pub(crate) const MAX_COMPLEXITY: usize = 256;

/// The most values one effective query binds (its literals, its claims and
/// those of the policies): SQLite refuses more than 32,766 variables, and
/// every binding is kept per view.
pub const MAX_QUERY_VALUES: usize = 10_000;

/// The longest TEXT or BLOB literal of a subscription query, in bytes.
pub const MAX_LITERAL_BYTES: usize = 64 * 1024;

/// The longest LIKE pattern, in bytes: patterns are matched on every
/// changed row, and SQLite refuses patterns over 50,000 bytes.
pub const MAX_LIKE_PATTERN_BYTES: usize = 1_000;

/// The first limit an effective query goes over: its bound values, and the
/// LIKE patterns among them (patterns never depend on the row, so each is
/// known once bound). The message names the limit.
pub(crate) fn over_limits(
    root: &crate::expr::Expr,
    params: &[tenantsync_types::Value],
) -> Option<String> {
    use tenantsync_types::Value;
    if params.len() > MAX_QUERY_VALUES {
        return Some(format!(
            "the query binds {} values (its literals and the policies' claims), more than the {MAX_QUERY_VALUES} a subscription may",
            params.len()
        ));
    }
    for v in params {
        let len = match v {
            Value::Text(t) => t.len(),
            Value::Blob(b) => b.len(),
            _ => 0,
        };
        if len > MAX_LITERAL_BYTES {
            return Some(format!(
                "a literal of {len} bytes is longer than the {MAX_LITERAL_BYTES} bytes a value in a subscription may have"
            ));
        }
    }
    let mut stack = vec![root];
    while let Some(e) = stack.pop() {
        if let crate::expr::Expr::Like { pattern, .. } = e
            && let Some(len) = pattern.constant_text_len(params)
            && len > MAX_LIKE_PATTERN_BYTES
        {
            return Some(format!(
                "a LIKE pattern of {len} bytes is longer than the {MAX_LIKE_PATTERN_BYTES} bytes a pattern may have"
            ));
        }
        stack.extend(e.children());
    }
    None
}

const NESTING_KEYWORDS: &[Keyword] = &[
    Keyword::AND,
    Keyword::OR,
    Keyword::NOT,
    Keyword::IS,
    Keyword::IN,
    Keyword::LIKE,
    Keyword::ILIKE,
    Keyword::GLOB,
    Keyword::REGEXP,
    Keyword::MATCH,
    Keyword::BETWEEN,
    Keyword::CASE,
    Keyword::WHEN,
    Keyword::SELECT,
    Keyword::EXISTS,
    Keyword::CAST,
    Keyword::COLLATE,
    Keyword::ESCAPE,
];

/// Where the first statement of `sql` that is over the limit goes over it,
/// and a message; `None` when every statement is within it (or the text
/// does not tokenize: the parser reports that).
pub(crate) fn too_complex(dialect: &dyn Dialect, sql: &str) -> Option<(Location, String)> {
    let tokens = Tokenizer::new(dialect, sql).tokenize_with_location().ok()?;
    let (mut ops, mut depth, mut max_depth) = (0usize, 0usize, 0usize);
    for t in &tokens {
        match &t.token {
            Token::SemiColon if depth == 0 => {
                (ops, max_depth) = (0, 0);
                continue;
            }
            Token::LParen => {
                depth += 1;
                max_depth = max_depth.max(depth);
            }
            Token::RParen => depth = depth.saturating_sub(1),
            // Keywords that combine or nest expressions; other words are
            // names (many names, like `id`, are keywords too).
            Token::Word(w) if w.quote_style.is_none() && NESTING_KEYWORDS.contains(&w.keyword) => {
                ops += 1
            }
            Token::Word(_) => {}
            Token::Number(..)
            | Token::Char(_)
            | Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::Comma
            | Token::Period
            | Token::Whitespace(_)
            | Token::Placeholder(_)
            | Token::SemiColon
            | Token::EOF => {}
            _ => ops += 1,
        }
        if ops + max_depth > MAX_COMPLEXITY {
            return Some((
                t.span.start,
                format!(
                    "the statement is too complex: more than {MAX_COMPLEXITY} operators, keywords and levels of parentheses (write long lists of alternatives as `IN (...)`)"
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use sqlparser::dialect::SQLiteDialect;

    use super::*;

    #[test]
    fn long_chains_and_deep_parentheses_are_over_the_limit() {
        let d = SQLiteDialect {};
        let chain = |n: usize| format!("SELECT * FROM t WHERE {}a = 0", "a = 1 OR ".repeat(n));
        // SELECT and `*`, then 2 per OR term and the last `=`.
        assert_eq!(too_complex(&d, &chain(100)), None);
        let (at, msg) = too_complex(&d, &chain(130)).unwrap();
        // The token that goes over: the 257th, inside the chain.
        assert_eq!(at.line, 1);
        assert!(at.column > 1000 && at.column < 1400, "{at:?}");
        assert!(msg.contains("too complex"), "{msg}");
        let parens =
            |n: usize| format!("SELECT * FROM t WHERE {}1{}", "(".repeat(n), ")".repeat(n));
        assert_eq!(too_complex(&d, &parens(200)), None);
        assert!(too_complex(&d, &parens(300)).is_some());
        // Long value lists and many statements are fine.
        let list = format!(
            "SELECT * FROM t WHERE a IN ({})",
            vec!["1"; 5000].join(", ")
        );
        assert_eq!(too_complex(&d, &list), None);
        let many = "SELECT 1 + 1 + 1;".repeat(1000);
        assert_eq!(too_complex(&d, &many), None);
    }
}
