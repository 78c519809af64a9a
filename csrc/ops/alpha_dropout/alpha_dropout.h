// alpha_dropout: torch's nn.AlphaDropout (rules.h, AlphaRule). Its arguments are dropout's,
// checked by dropout's checks (ops/dropout/dropout.h).
#pragma once

namespace fused_dropout {

inline constexpr char kAlphaDropoutOp[] = "fused_dropout::alpha_dropout";

}  // namespace fused_dropout
