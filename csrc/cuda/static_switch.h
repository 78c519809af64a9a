// Turns a run-time bool into a compile-time constant for the code it guards, in the manner
// of flash-attention's static_switch.h:
//
//   BOOL_SWITCH(aligned, kAligned, [&] { kernel<kAligned><<<...>>>(...); });
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()
