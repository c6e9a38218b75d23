// Include FIRST (before any other header) in a kernel file whose results must match torch bit for
// bit: it stops the compiler from fusing a*b + c into one FMA for the rest of that translation
// unit. GCC does so at -O3 even with -std=c++17 (and across statements), clang within a statement,
// and torch rounds the product before the add. Placed first so that every function of the file,
// the inline helpers it includes among them, carries the same setting (GCC will not inline across
// differing optimize settings). Explicit std::fma calls are unaffected.
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
