output "node_group_name" {
  description = "The managed node group."
  value       = aws_eks_node_group.gpu.node_group_name
}

output "node_group_arn" {
  description = "ARN of the managed node group."
  value       = aws_eks_node_group.gpu.arn
}

output "node_role_arn" {
  description = "IAM role of the GPU nodes."
  value       = aws_iam_role.node.arn
}

output "launch_template_id" {
  description = "Launch template of the GPU nodes."
  value       = aws_launch_template.node.id
}

output "node_labels" {
  description = "Labels on every GPU node (the RayCluster worker group's nodeSelector)."
  value       = local.node_labels
}

output "node_taint" {
  description = "Taint on every GPU node (the RayCluster worker group tolerates it)."
  value       = local.gpu_taint
}
