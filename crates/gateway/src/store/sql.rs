//! One way to run the store's SQL on either database: statements are written once, in the
//! dialect both SQLite and PostgreSQL accept, with SQLite's numbered parameters (`?1`), which
//! become PostgreSQL's (`$1`) on the way. Values go in as [`Arg`]s, whose types also type the
//! PostgreSQL statement, and come out as a [`Row`] of [`Val`]s read with [`Row::get`].
//!
//! What the two do not share stays small and explicit: the schema and its migrations
//! (`store/pg.rs` for PostgreSQL), and the few places that ask [`Tx::is_pg`].

use std::borrow::Cow;

use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use super::{StoreError, pg::PgConn};

/// A statement's parameter. The type is known even for a null, so PostgreSQL need not guess.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    /// An integer (PostgreSQL `BIGINT`).
    Int(Option<i64>),
    /// Text.
    Text(Option<&'a str>),
    /// Bytes (PostgreSQL `BYTEA`).
    Blob(Option<&'a [u8]>),
}

/// What a value becomes as a parameter.
pub(crate) trait IntoArg {
    /// The parameter.
    fn arg(&self) -> Arg<'_>;
}

impl IntoArg for i64 {
    fn arg(&self) -> Arg<'_> {
        Arg::Int(Some(*self))
    }
}
impl IntoArg for u64 {
    fn arg(&self) -> Arg<'_> {
        Arg::Int(Some(*self as i64))
    }
}
impl IntoArg for u32 {
    fn arg(&self) -> Arg<'_> {
        Arg::Int(Some(i64::from(*self)))
    }
}
impl IntoArg for bool {
    fn arg(&self) -> Arg<'_> {
        Arg::Int(Some(i64::from(*self)))
    }
}
impl IntoArg for str {
    fn arg(&self) -> Arg<'_> {
        Arg::Text(Some(self))
    }
}
impl IntoArg for String {
    fn arg(&self) -> Arg<'_> {
        Arg::Text(Some(self))
    }
}
impl IntoArg for [u8] {
    fn arg(&self) -> Arg<'_> {
        Arg::Blob(Some(self))
    }
}
impl IntoArg for Vec<u8> {
    fn arg(&self) -> Arg<'_> {
        Arg::Blob(Some(self))
    }
}
impl IntoArg for Option<String> {
    fn arg(&self) -> Arg<'_> {
        Arg::Text(self.as_deref())
    }
}
impl IntoArg for Option<&str> {
    fn arg(&self) -> Arg<'_> {
        Arg::Text(*self)
    }
}
impl<T: IntoArg + ?Sized> IntoArg for &T {
    fn arg(&self) -> Arg<'_> {
        (**self).arg()
    }
}

/// The parameters of a statement: `args![a, b]`.
macro_rules! args {
    ($($e:expr),* $(,)?) => {
        &[$($crate::store::sql::IntoArg::arg(&$e)),*][..]
    };
}
pub(crate) use args;

impl Arg<'_> {
    /// The PostgreSQL type the statement is prepared with.
    pub(crate) fn pg_type(&self) -> Type {
        match self {
            Arg::Int(_) => Type::INT8,
            Arg::Text(_) => Type::TEXT,
            Arg::Blob(_) => Type::BYTEA,
        }
    }
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Arg::Int(Some(i)) => ValueRef::Integer(i),
            Arg::Text(Some(t)) => ValueRef::Text(t.as_bytes()),
            Arg::Blob(Some(b)) => ValueRef::Blob(b),
            Arg::Int(None) | Arg::Text(None) | Arg::Blob(None) => ValueRef::Null,
        }))
    }
}

impl ToSql for Arg<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Arg::Int(v) => v.to_sql(ty, out),
            Arg::Text(v) => v.to_sql(ty, out),
            Arg::Blob(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <Option<i64> as ToSql>::accepts(ty)
            || <Option<&str> as ToSql>::accepts(ty)
            || <Option<&[u8]> as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// A value read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val {
    /// SQL `NULL`.
    Null,
    /// An integer (also SQLite's booleans).
    Int(i64),
    /// A PostgreSQL boolean.
    Bool(bool),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// One row of a result.
#[derive(Debug, Clone)]
pub(crate) struct Row(Vec<Val>);

/// What a [`Val`] can be read as.
pub(crate) trait FromVal: Sized {
    /// The value, or what it was instead.
    fn from_val(v: &Val) -> Result<Self, String>;
}

impl FromVal for i64 {
    fn from_val(v: &Val) -> Result<Self, String> {
        match v {
            Val::Int(i) => Ok(*i),
            Val::Bool(b) => Ok(i64::from(*b)),
            other => Err(format!("an integer expected, {other:?} found")),
        }
    }
}
impl FromVal for u64 {
    fn from_val(v: &Val) -> Result<Self, String> {
        i64::from_val(v).map(|i| i as u64)
    }
}
impl FromVal for usize {
    fn from_val(v: &Val) -> Result<Self, String> {
        i64::from_val(v).map(|i| i as usize)
    }
}
impl FromVal for bool {
    fn from_val(v: &Val) -> Result<Self, String> {
        match v {
            Val::Bool(b) => Ok(*b),
            Val::Int(i) => Ok(*i != 0),
            other => Err(format!("a boolean expected, {other:?} found")),
        }
    }
}
impl FromVal for String {
    fn from_val(v: &Val) -> Result<Self, String> {
        match v {
            Val::Text(t) => Ok(t.clone()),
            other => Err(format!("text expected, {other:?} found")),
        }
    }
}
impl FromVal for Vec<u8> {
    fn from_val(v: &Val) -> Result<Self, String> {
        match v {
            Val::Blob(b) => Ok(b.clone()),
            other => Err(format!("bytes expected, {other:?} found")),
        }
    }
}
impl<T: FromVal> FromVal for Option<T> {
    fn from_val(v: &Val) -> Result<Self, String> {
        match v {
            Val::Null => Ok(None),
            v => T::from_val(v).map(Some),
        }
    }
}

impl Row {
    /// Column `i` as a `T`; a missing column or another type is [`StoreError::Corrupt`].
    pub(crate) fn get<T: FromVal>(&self, i: usize) -> Result<T, StoreError> {
        let v = self
            .0
            .get(i)
            .ok_or_else(|| StoreError::Corrupt(format!("no column {i} in the row")))?;
        T::from_val(v).map_err(|e| StoreError::Corrupt(format!("column {i}: {e}")))
    }

    fn from_sqlite(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Self> {
        use rusqlite::types::ValueRef;
        (0..n)
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(i) => Val::Int(i),
                    ValueRef::Real(f) => Val::Int(f as i64),
                    ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Val::Blob(b.to_vec()),
                })
            })
            .collect::<rusqlite::Result<_>>()
            .map(Row)
    }

    pub(super) fn from_pg(r: &tokio_postgres::Row) -> Result<Self, StoreError> {
        let corrupt = |e: tokio_postgres::Error| StoreError::Corrupt(e.to_string());
        r.columns()
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let v = match *c.type_() {
                    Type::INT8 => r.try_get::<_, Option<i64>>(i).map(|v| v.map(Val::Int)),
                    Type::INT4 => r
                        .try_get::<_, Option<i32>>(i)
                        .map(|v| v.map(|v| Val::Int(v.into()))),
                    Type::INT2 => r
                        .try_get::<_, Option<i16>>(i)
                        .map(|v| v.map(|v| Val::Int(v.into()))),
                    Type::BOOL => r.try_get::<_, Option<bool>>(i).map(|v| v.map(Val::Bool)),
                    Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i).map(|v| v.map(Val::Blob)),
                    _ => r.try_get::<_, Option<String>>(i).map(|v| v.map(Val::Text)),
                };
                Ok(v.map_err(corrupt)?.unwrap_or(Val::Null))
            })
            .collect::<Result<_, _>>()
            .map(Row)
    }
}

/// A statement in PostgreSQL's parameter style: `?N` becomes `$N`. The store's SQL has no `?`
/// elsewhere (none in its string literals).
pub(super) fn pg_sql(sql: &str) -> Cow<'_, str> {
    if !sql.contains('?') {
        return Cow::Borrowed(sql);
    }
    Cow::Owned(sql.replace('?', "$"))
}

/// Where statements run: a SQLite connection (perhaps inside a transaction), or a pooled
/// PostgreSQL connection (perhaps inside one).
pub(crate) enum Tx<'a> {
    /// SQLite.
    Lite(&'a rusqlite::Connection),
    /// PostgreSQL.
    Pg(&'a PgConn),
}

impl Tx<'_> {
    /// Whether this is PostgreSQL (for the few statements the two spell differently).
    pub(crate) fn is_pg(&self) -> bool {
        matches!(self, Tx::Pg(_))
    }

    /// Runs a statement; how many rows it changed.
    pub(crate) fn exec(&self, sql: &str, args: &[Arg<'_>]) -> Result<usize, StoreError> {
        match self {
            Tx::Lite(c) => Ok(c
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(args))?),
            Tx::Pg(c) => c.execute(sql, args).map(|n| n as usize),
        }
    }

    /// Every row of a query.
    pub(crate) fn rows(&self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StoreError> {
        match self {
            Tx::Lite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let rows =
                    stmt.query_map(rusqlite::params_from_iter(args), |r| Row::from_sqlite(r, n))?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
            Tx::Pg(c) => c.query(sql, args),
        }
    }

    /// The first row of a query, if any.
    pub(crate) fn opt(&self, sql: &str, args: &[Arg<'_>]) -> Result<Option<Row>, StoreError> {
        match self {
            Tx::Lite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
                Ok(match rows.next()? {
                    Some(r) => Some(Row::from_sqlite(r, n)?),
                    None => None,
                })
            }
            Tx::Pg(c) => Ok(c.query(sql, args)?.into_iter().next()),
        }
    }

    /// The first row of a query, which must have one.
    pub(crate) fn one(&self, sql: &str, args: &[Arg<'_>]) -> Result<Row, StoreError> {
        self.opt(sql, args)?
            .ok_or_else(|| StoreError::Corrupt(format!("no row for {sql}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_become_dollars() {
        assert_eq!(
            pg_sql("SELECT a FROM t WHERE b = ?1 AND (?2 = 0 OR c < ?2)"),
            "SELECT a FROM t WHERE b = $1 AND ($2 = 0 OR c < $2)"
        );
        assert!(matches!(pg_sql("SELECT 1"), Cow::Borrowed(_)));
    }

    #[test]
    fn values_read_as_what_they_are_or_say_what_they_were() {
        let row = Row(vec![
            Val::Int(3),
            Val::Bool(true),
            Val::Null,
            Val::Text("x".into()),
        ]);
        assert_eq!(row.get::<u64>(0).expect("int"), 3);
        assert!(row.get::<bool>(0).expect("int as bool"));
        assert!(row.get::<bool>(1).expect("bool"));
        assert_eq!(row.get::<Option<String>>(2).expect("null"), None);
        assert_eq!(row.get::<String>(3).expect("text"), "x");
        let e = row.get::<i64>(3).expect_err("text is no integer");
        assert!(e.to_string().contains("column 3"), "{e}");
        assert!(row.get::<i64>(9).is_err());
    }
}
