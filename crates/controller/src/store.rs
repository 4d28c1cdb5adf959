//! The controller's tables in its embedded database (`walkabout-store`): hosts, VMs and
//! their placement, plans, migrations and the event log, so a restarted controller knows
//! its cluster and can resume (or re-plan) a plan it was executing; counters for ids
//! (`plan`, `walk`, `migration`). Each table's version is its record's layout version; a
//! record that no longer decodes is reported by table and key, never silently dropped.

use crate::cluster::VIEW_VERSION;
use crate::events::EVENT_VERSION;
use crate::execute::MIGRATION_VERSION;
use crate::plans::PLAN_VERSION;
use walkabout_store::{no_upgrades, Log, Table};

pub use walkabout_store::{Store, StoreError};

/// Hosts by name.
pub const HOSTS: Table = Table::new("hosts", VIEW_VERSION, no_upgrades);
/// VMs by name, with their placement.
pub const VMS: Table = Table::new("vms", VIEW_VERSION, no_upgrades);
/// Plans by id.
pub const PLANS: Table = Table::new("plans", PLAN_VERSION, no_upgrades);
/// Migrations by id.
pub const MIGRATIONS: Table = Table::new("migrations", MIGRATION_VERSION, no_upgrades);
/// Failovers by id (`f1`...).
pub const FAILOVERS: Table = Table::new("failovers", crate::failover::FAILOVER_VERSION, no_upgrades);
/// The event log, by sequence number.
pub const EVENTS: Log = Log::new("events", EVENT_VERSION, no_upgrades);
