//! Command-line values shared by the `vmm` binary's commands and the lab's:
//! clap parsers for the one strategy enum (the guest contract's) and the one
//! CPL enum (the API's), with each value's help.

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use guest_abi::Strategy;

/// A name that is not one of the possible values (clap lists them first, so
/// this is only reached if the lists disagree).
#[derive(Debug, thiserror::Error)]
#[error("unknown value {0:?}")]
pub struct UnknownValue(String);

/// Parses `--memmap-init`-style values into [`Strategy`].
pub fn strategy_parser() -> impl TypedValueParser<Value = Strategy> {
    PossibleValuesParser::new(Strategy::ALL.map(|s| PossibleValue::new(s.name()).help(s.summary())))
        .try_map(|name| Strategy::from_name(&name).ok_or(UnknownValue(name)))
}

/// Parses `--reclaim` values into [`api::Reclaim`].
pub fn reclaim_parser() -> impl TypedValueParser<Value = api::Reclaim> {
    let help = |r: api::Reclaim| match r {
        api::Reclaim::Off => "Nothing goes back: the host keeps what the guest once touched",
        api::Reclaim::Data => "Free data pages go back (as balloon free page reporting)",
        api::Reclaim::Full => "Data pages, the memmap of emptied chunks, and KVM memslots (ondemand only)",
    };
    PossibleValuesParser::new(api::Reclaim::ALL.map(|r| PossibleValue::new(r.name()).help(help(r))))
        .try_map(|name| api::Reclaim::from_name(&name).ok_or(UnknownValue(name)))
}

/// Parses `--guest-cpl` values into [`api::GuestCpl`].
pub fn cpl_parser() -> impl TypedValueParser<Value = api::GuestCpl> {
    PossibleValuesParser::new(api::GuestCpl::ALL.map(|c| PossibleValue::new(c.name()).help(c.summary())))
        .try_map(|name| api::GuestCpl::from_name(&name).ok_or(UnknownValue(name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[arg(long, value_parser = strategy_parser(), default_value = "ondemand")]
        s: Strategy,
        #[arg(long, value_parser = cpl_parser(), default_value = "auto")]
        c: api::GuestCpl,
    }

    #[test]
    fn every_name_parses_and_others_are_refused() {
        for s in Strategy::ALL {
            assert_eq!(T::try_parse_from(["t", "--s", s.name()]).unwrap().s, s);
        }
        for c in api::GuestCpl::ALL {
            assert_eq!(T::try_parse_from(["t", "--c", c.name()]).unwrap().c, c);
        }
        let t = T::try_parse_from(["t"]).unwrap();
        assert_eq!((t.s, t.c), (Strategy::OnDemand, api::GuestCpl::Auto));
        let e = T::try_parse_from(["t", "--s", "lazy"]).err().unwrap().to_string();
        assert!(e.contains("possible values"), "{e}");
        assert!(T::try_parse_from(["t", "--c", "1"]).is_err());
    }
}
