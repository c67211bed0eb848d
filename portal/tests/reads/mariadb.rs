//! mariadb: to come.
