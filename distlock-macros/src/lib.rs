//! The `#[locked]` attribute of distlock (use it as `#[distlock::locked(...)]`).
//!
//! ```ignore
//! #[distlock::locked("payment:{order_id}", ttl = "10s", wait = "5s", locker = self.locker)]
//! async fn process_payment(&self, order_id: u64) -> Result<Receipt, PaymentError> {
//!     // runs while holding the lock `payment:<order_id>`; dropped if the lock is lost
//! }
//! ```
//!
//! See the `distlock` crate's documentation of `locked` for every option.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{Expr, FnArg, Ident, ItemFn, LitStr, Pat, ReturnType, Token, Type};

/// Runs an `async fn` under a distributed lock whose key is built from its arguments.
///
/// Documented in full on `distlock::locked`.
#[proc_macro_attribute]
pub fn locked(attr: TokenStream, item: TokenStream) -> TokenStream {
    let options = syn::parse_macro_input!(attr as Options);
    let function = syn::parse_macro_input!(item as ItemFn);
    expand(options, function)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

/// What to do when the lock cannot be had.
#[derive(Clone, Copy, PartialEq)]
enum OnBusy {
    /// Return `Err(E::from(LockError))`: the function returns `Result<T, E>`.
    Error,
    /// Return `None`: the function returns `Option<T>` (the "one host runs it" case).
    Skip,
}

#[derive(Default)]
struct Options {
    template: Option<LitStr>,
    key: Option<Expr>,
    ttl: Option<TokenStream2>,
    wait: Option<TokenStream2>,
    retry_delay: Option<TokenStream2>,
    retries: Option<Expr>,
    locker: Option<Expr>,
    auto_renew: Option<Expr>,
    guard: Option<Ident>,
    on_busy: Option<(OnBusy, Span)>,
}

const OPTION_NAMES: &str =
    "key, ttl, wait, retries, retry_delay, locker, on_busy, guard, auto_renew";

impl Parse for Options {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let mut options = Options::default();
        while !input.is_empty() {
            if input.peek(LitStr) {
                let template: LitStr = input.parse()?;
                if options.template.replace(template.clone()).is_some() {
                    return Err(syn::Error::new(
                        template.span(),
                        "#[locked] takes one key template",
                    ));
                }
            } else {
                let name: Ident = input.parse().map_err(|error| {
                    syn::Error::new(
                        error.span(),
                        format!(
                            "expected a key template (\"order:{{id}}\") or an option: {OPTION_NAMES}"
                        ),
                    )
                })?;
                input.parse::<Token![=]>()?;
                options.set(&name, input)?;
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        Ok(options)
    }
}

impl Options {
    fn set(&mut self, name: &Ident, input: ParseStream) -> syn::Result<()> {
        let duplicate = || syn::Error::new(name.span(), format!("option `{name}` given twice"));
        match name.to_string().as_str() {
            "key" => replace_once(&mut self.key, input.parse()?, duplicate),
            "ttl" => replace_once(&mut self.ttl, ttl(input)?, duplicate),
            "wait" => replace_once(&mut self.wait, duration(input)?, duplicate),
            "retry_delay" => replace_once(&mut self.retry_delay, duration(input)?, duplicate),
            "retries" => replace_once(&mut self.retries, input.parse()?, duplicate),
            "locker" => replace_once(&mut self.locker, input.parse()?, duplicate),
            "auto_renew" => replace_once(&mut self.auto_renew, input.parse()?, duplicate),
            "guard" => replace_once(&mut self.guard, input.parse()?, duplicate),
            "on_busy" => {
                let value: Ident = input.parse()?;
                let on_busy = match value.to_string().as_str() {
                    "error" => OnBusy::Error,
                    "skip" => OnBusy::Skip,
                    other => {
                        return Err(syn::Error::new(
                            value.span(),
                            format!(
                                "unknown on_busy `{other}`: expected `error` (return Err, the \
                                 default) or `skip` (return None)"
                            ),
                        ));
                    }
                };
                replace_once(&mut self.on_busy, (on_busy, value.span()), duplicate)
            }
            other => Err(syn::Error::new(
                name.span(),
                format!("unknown option `{other}`: expected one of {OPTION_NAMES}"),
            )),
        }
    }
}

fn replace_once<T>(
    slot: &mut Option<T>,
    value: T,
    duplicate: impl FnOnce() -> syn::Error,
) -> syn::Result<()> {
    if slot.replace(value).is_some() {
        return Err(duplicate());
    }
    Ok(())
}

/// The `ttl` option: as [`duration`], and a literal must also be a TTL a lock can use:
/// more than 7.62 ms (the clock-drift allowance and the lost margin must leave a third of
/// it and a millisecond for the first renewal; `lock_core::check_usable_ttl`) and at most a
/// year.
fn ttl(input: ParseStream) -> syn::Result<TokenStream2> {
    if input.peek(LitStr) {
        let literal: LitStr = input.fork().parse()?;
        let nanos = parse_duration(&literal.value())
            .map_err(|reason| syn::Error::new(literal.span(), reason))?;
        const USABLE_FROM: u64 = 7_620_000;
        const YEAR: u64 = 365 * 24 * 3600 * 1_000_000_000;
        if nanos <= USABLE_FROM || nanos > YEAR {
            return Err(syn::Error::new(
                literal.span(),
                format!(
                    "ttl {:?} cannot be used: a TTL must be more than 7.62 ms (clock drift and \
                     the lost margin must leave time to renew it) and at most a year",
                    literal.value()
                ),
            ));
        }
    }
    duration(input)
}

/// A duration option: a string with units, checked at compile time (`"10s"`, `"100ms"`,
/// `"1m30s"`), or any expression of type `std::time::Duration`.
fn duration(input: ParseStream) -> syn::Result<TokenStream2> {
    if input.peek(LitStr) {
        let literal: LitStr = input.parse()?;
        let nanos = parse_duration(&literal.value())
            .map_err(|reason| syn::Error::new(literal.span(), reason))?;
        Ok(quote_spanned!(literal.span()=> ::std::time::Duration::from_nanos(#nanos)))
    } else {
        let expr: Expr = input.parse()?;
        Ok(quote!((#expr)))
    }
}

/// `"1m30s"` → nanoseconds. Units: ns, us, ms, s, m, h; at least one number with a unit.
fn parse_duration(text: &str) -> Result<u64, String> {
    let bad = |why: &str| {
        format!("invalid duration {text:?}: {why} (write e.g. \"30s\", \"100ms\", \"1m30s\")")
    };
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad("empty"));
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad("expected a number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| bad("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let scale: u64 = match &rest[..unit_len] {
            "ns" => 1,
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(bad("missing unit")),
            _ => return Err(bad("unknown unit")),
        };
        rest = rest[unit_len..].trim_start();
        total = number
            .checked_mul(scale)
            .and_then(|part| total.checked_add(part))
            .ok_or_else(|| bad("too large"))?;
    }
    Ok(total)
}

/// A key template: `"payment:{order_id}"`, `"{self.tenant}:job"`; `{{` and `}}` are braces.
/// Returns a `format!` string and the placeholder expressions.
fn parse_template(template: &LitStr, arguments: &[String]) -> syn::Result<(String, Vec<Expr>)> {
    let text = template.value();
    let error = |message: String| syn::Error::new(template.span(), message);
    let mut format = String::new();
    let mut values = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                format.push_str("{{");
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                format.push_str("}}");
            }
            '}' => {
                return Err(error(format!(
                    "unmatched `}}` in key template {text:?} (write `}}}}` for a brace)"
                )));
            }
            '{' => {
                let mut inner = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => inner.push(c),
                        None => {
                            return Err(error(format!("unclosed `{{` in key template {text:?}")));
                        }
                    }
                }
                let expr: Expr = syn::parse_str(inner.trim()).map_err(|_| {
                    error(format!(
                        "`{{{inner}}}` in key template {text:?} is not an argument, a field of one \
                         (`{{order.id}}`, `{{self.tenant}}`) or a method call on one"
                    ))
                })?;
                let root = root_name(&expr).ok_or_else(|| {
                    error(format!(
                        "`{{{inner}}}` in key template {text:?}: use an argument, a field of one or \
                         a method call on one; for anything else use `key = <expression>`"
                    ))
                })?;
                if !arguments.contains(&root) {
                    return Err(error(format!(
                        "`{{{inner}}}` in key template {text:?}: the function has no argument \
                         named `{root}` (its arguments: {})",
                        if arguments.is_empty() {
                            "none".to_owned()
                        } else {
                            arguments.join(", ")
                        }
                    )));
                }
                format.push_str("{}");
                values.push(expr);
            }
            c => format.push(c),
        }
    }
    Ok((format, values))
}

/// The argument an expression starts from: `order` in `order.id`, `self` in `self.tenant`.
fn root_name(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Path(path) if path.qself.is_none() => path.path.get_ident().map(Ident::to_string),
        Expr::Field(field) => root_name(&field.base),
        Expr::MethodCall(call) => root_name(&call.receiver),
        Expr::Index(index) => root_name(&index.expr),
        Expr::Paren(paren) => root_name(&paren.expr),
        Expr::Reference(reference) => root_name(&reference.expr),
        _ => None,
    }
}

/// The names a template may use: `self` and every argument bound to a plain name.
fn argument_names(function: &ItemFn) -> Vec<String> {
    function
        .sig
        .inputs
        .iter()
        .filter_map(|input| match input {
            FnArg::Receiver(_) => Some("self".to_owned()),
            FnArg::Typed(typed) => match &*typed.pat {
                Pat::Ident(ident) => Some(ident.ident.to_string()),
                _ => None,
            },
        })
        .collect()
}

/// The last path segment's name of a type (`Result` in `std::io::Result<T>`).
fn type_name(ty: &Type) -> Option<String> {
    match ty {
        Type::Path(path) => path.path.segments.last().map(|s| s.ident.to_string()),
        Type::Paren(paren) => type_name(&paren.elem),
        _ => None,
    }
}

fn expand(options: Options, function: ItemFn) -> syn::Result<TokenStream2> {
    if function.sig.asyncness.is_none() {
        return Err(syn::Error::new(
            function.sig.fn_token.span(),
            "#[locked] goes on an `async fn`: the lock is taken and held across awaits",
        ));
    }
    let on_busy = options.on_busy.map_or(OnBusy::Error, |(mode, _)| mode);
    let return_type = match &function.sig.output {
        ReturnType::Type(_, ty) => (**ty).clone(),
        ReturnType::Default => {
            return Err(syn::Error::new(
                function.sig.span(),
                "#[locked] needs the function to return `Result<T, E>` with `E: \
                 From<distlock::LockError>` (on_busy = error, the default) or `Option<T>` \
                 (on_busy = skip)",
            ));
        }
    };
    let name = type_name(&return_type);
    match on_busy {
        OnBusy::Error if !name.as_deref().is_some_and(|name| name.ends_with("Result")) => {
            return Err(syn::Error::new(
                return_type.span(),
                "with on_busy = error (the default) the function must return `Result<T, E>` with \
                 `E: From<distlock::LockError>`; to return `Option<T>` (None when the lock is \
                 busy), add `on_busy = skip`",
            ));
        }
        OnBusy::Skip if name.as_deref() != Some("Option") => {
            return Err(syn::Error::new(
                return_type.span(),
                "with on_busy = skip the function must return `Option<T>` (None when the lock \
                 is busy)",
            ));
        }
        _ => {}
    }

    let arguments = argument_names(&function);
    let key = match (&options.template, &options.key) {
        (Some(template), None) => {
            let (format, values) = parse_template(template, &arguments)?;
            quote_spanned!(template.span()=> ::std::format!(#format, #(&(#values)),*))
        }
        (None, Some(key)) => quote!(::std::string::ToString::to_string(&(#key))),
        (Some(template), Some(_)) => {
            return Err(syn::Error::new(
                template.span(),
                "give the key once: a template string or `key = <expression>`, not both",
            ));
        }
        (None, None) => {
            return Err(syn::Error::new(
                Span::call_site(),
                "#[locked] needs a key: a template such as \"payment:{order_id}\", or `key = \
                 <expression>`",
            ));
        }
    };

    // Leaving the function when the lock cannot be had.
    let give_up = match on_busy {
        OnBusy::Error => quote! {
            return ::std::result::Result::Err(::std::convert::From::from(__distlock_error))
        },
        OnBusy::Skip => quote! {{
            ::distlock::__private::skipped(&__distlock_error);
            return ::std::option::Option::None;
        }},
    };
    let locker = match &options.locker {
        Some(locker) => quote! {
            let __distlock_locker: &::distlock::Locker = &(#locker);
        },
        None => quote! {
            let __distlock_default = match ::distlock::default_locker() {
                ::std::result::Result::Ok(locker) => locker,
                ::std::result::Result::Err(__distlock_error) => #give_up,
            };
            let __distlock_locker: &::distlock::Locker = &__distlock_default;
        },
    };
    let mut request = quote!(__distlock_locker.lock(__distlock_key));
    if let Some(ttl) = &options.ttl {
        request = quote!(#request.ttl(#ttl));
    }
    if let Some(wait) = &options.wait {
        request = quote!(#request.wait(#wait));
    }
    if let Some(retries) = &options.retries {
        request = quote!(#request.retries(#retries));
    }
    if let Some(delay) = &options.retry_delay {
        request = quote!(#request.retry_delay(#delay));
    }
    if let Some(auto_renew) = &options.auto_renew {
        request = quote!(#request.auto_renew(#auto_renew));
    }
    let guard_binding = options.guard.as_ref().map(|guard| {
        quote! { let #guard: &::distlock::LockGuard = __distlock_guard; }
    });
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = function;
    Ok(quote! {
        #(#attrs)*
        #vis #sig {
            let __distlock_key: ::std::string::String = #key;
            #locker
            let __distlock_outcome = #request
                .run_with(async move |__distlock_guard: &::distlock::LockGuard| -> #return_type {
                    #guard_binding
                    #block
                })
                .await;
            match __distlock_outcome {
                ::std::result::Result::Ok(__distlock_output) => __distlock_output,
                ::std::result::Result::Err(__distlock_error) => #give_up,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(10_000_000_000));
        assert_eq!(parse_duration("100ms"), Ok(100_000_000));
        assert_eq!(parse_duration("1m30s"), Ok(90_000_000_000));
        assert_eq!(parse_duration("1h"), Ok(3_600_000_000_000));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999h").is_err());
    }

    #[test]
    fn templates() {
        let arguments = vec!["self".to_owned(), "order_id".to_owned(), "order".to_owned()];
        let literal = |text: &str| LitStr::new(text, Span::call_site());
        let (format, values) = parse_template(
            &literal("payment:{order_id}:{self.tenant}:{{x}}"),
            &arguments,
        )
        .unwrap();
        assert_eq!(format, "payment:{}:{}:{{x}}");
        assert_eq!(values.len(), 2);
        assert!(parse_template(&literal("{missing}"), &arguments).is_err());
        assert!(parse_template(&literal("{order_id"), &arguments).is_err());
        assert!(parse_template(&literal("x}"), &arguments).is_err());
        assert!(parse_template(&literal("{1 + 2}"), &arguments).is_err());
        let (_, values) =
            parse_template(&literal("{order.id}-{order.line(0)}"), &arguments).unwrap();
        assert_eq!(values.len(), 2);
    }
}
