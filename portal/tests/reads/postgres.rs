//! postgres: to come.
