variable "cluster_name" {
  description = "Name of the existing EKS cluster."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets for the GPU nodes (in zones that offer the instance type)."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "Give at least one subnet."
  }
}

variable "instance_type" {
  description = "GPU instance type (one NVIDIA GPU per node for g5.xlarge to g5.8xlarge, g6.xlarge to g6.8xlarge)."
  type        = string
  default     = "g5.2xlarge"

  validation {
    condition     = can(regex("^(g5|g6|g6e)\\.[0-9]*x?large$", var.instance_type))
    error_message = "Use a g5, g6 or g6e instance type (NVIDIA GPU), e.g. g5.2xlarge."
  }
}

variable "ami_type" {
  description = "EKS-optimized accelerated AMI (NVIDIA driver included). Install the NVIDIA device plugin in the cluster."
  type        = string
  default     = "AL2023_x86_64_NVIDIA"

  validation {
    condition     = contains(["AL2023_x86_64_NVIDIA", "BOTTLEROCKET_x86_64_NVIDIA"], var.ami_type)
    error_message = "Use AL2023_x86_64_NVIDIA or BOTTLEROCKET_x86_64_NVIDIA."
  }
}

variable "capacity_type" {
  description = "ON_DEMAND or SPOT."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT"], var.capacity_type)
    error_message = "Use ON_DEMAND or SPOT."
  }
}

variable "min_size" {
  description = "Fewest GPU nodes (0 lets the pool scale to zero when no replica needs a GPU)."
  type        = number
  default     = 0

  validation {
    condition     = var.min_size >= 0
    error_message = "min_size must be 0 or more."
  }
}

variable "max_size" {
  description = "Most GPU nodes; at least the RayCluster worker group's maxReplicas (one GPU worker per node)."
  type        = number
  default     = 4

  validation {
    condition     = var.max_size >= 1
    error_message = "max_size must be 1 or more."
  }
}

variable "desired_size" {
  description = "GPU nodes at creation; the cluster autoscaler moves it afterwards (Terraform ignores later changes)."
  type        = number
  default     = 1
}

variable "disk_size_gib" {
  description = "Root volume in GiB (container images and the node-local model cache)."
  type        = number
  default     = 200

  validation {
    condition     = var.disk_size_gib >= 50
    error_message = "disk_size_gib must be at least 50."
  }
}

variable "tags" {
  description = "Tags for every resource of the pool."
  type        = map(string)
  default     = {}
}
