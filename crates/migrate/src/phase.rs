//! The phases of a migration: [`Phase`] is part of the wire contract (`walkabout-api`),
//! where its transitions are decided in one place (`Phase::can_become`).

pub use walkabout_api::Phase;
